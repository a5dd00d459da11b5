//! Models: the protocol's small CNN for Fashion-MNIST and tch's ResNet-18/50.

use tch::Tensor;
use tch::nn::{self, ModuleT};

/// Which network to train.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// conv(1->32, 3x3, pad 1)-relu-maxpool2, conv(32->64, 3x3, pad 1)-relu-maxpool2,
    /// linear(64*7*7->128)-relu, linear(128->classes), for 28x28 grey images.
    Cnn,
    /// ResNet-18 (tch::vision::resnet).
    Resnet18,
    /// ResNet-50 (tch::vision::resnet).
    Resnet50,
}

impl ModelKind {
    /// The name used on the command line and in checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Cnn => "cnn",
            ModelKind::Resnet18 => "resnet18",
            ModelKind::Resnet50 => "resnet50",
        }
    }
}

/// The protocol's CNN.
#[derive(Debug)]
pub struct Cnn {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Cnn {
    /// Creates the CNN's variables under `p` with PyTorch's default
    /// initialisation (weights and biases uniform in `±1/sqrt(fan_in)`), as
    /// the protocol's model has; tch's own default (Kaiming uniform with the
    /// ReLU gain, zero conv biases) draws weights 2.45 times larger.
    pub fn new(p: &nn::Path, num_classes: i64) -> Cnn {
        let uniform = |fan_in: i64| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            }
        };
        let conv = |fan_in: i64| nn::ConvConfig {
            padding: 1,
            ws_init: uniform(fan_in),
            bs_init: uniform(fan_in),
            ..Default::default()
        };
        let linear = |fan_in: i64| nn::LinearConfig {
            ws_init: uniform(fan_in),
            bs_init: Some(uniform(fan_in)),
            bias: true,
        };
        Cnn {
            conv1: nn::conv2d(p / "conv1", 1, 32, 3, conv(9)),
            conv2: nn::conv2d(p / "conv2", 32, 64, 3, conv(32 * 9)),
            fc1: nn::linear(p / "fc1", 64 * 7 * 7, 128, linear(64 * 7 * 7)),
            fc2: nn::linear(p / "fc2", 128, num_classes, linear(128)),
        }
    }
}

impl ModuleT for Cnn {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        xs.apply(&self.conv1)
            .relu()
            .max_pool2d_default(2)
            .apply(&self.conv2)
            .relu()
            .max_pool2d_default(2)
            .flatten(1, -1)
            .apply(&self.fc1)
            .relu()
            .apply(&self.fc2)
    }
}

/// Builds `kind` with `num_classes` outputs in `vs`.
pub fn build(vs: &nn::VarStore, kind: ModelKind, num_classes: i64) -> Box<dyn ModuleT> {
    let root = vs.root();
    match kind {
        ModelKind::Cnn => Box::new(Cnn::new(&root, num_classes)),
        ModelKind::Resnet18 => Box::new(tch::vision::resnet::resnet18(&root, num_classes)),
        ModelKind::Resnet50 => Box::new(tch::vision::resnet::resnet50(&root, num_classes)),
    }
}
