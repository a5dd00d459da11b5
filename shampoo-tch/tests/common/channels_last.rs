//! A small convolutional model and its training with contiguous or
//! channels-last weights (tests/channels_last.rs, tests/cuda.rs).

use std::sync::Arc;

use shampoo_core::ShampooConfig;
use shampoo_dist::Communicator;
use shampoo_tch::Shampoo;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::{bits, init_fixed};

pub const STEPS: usize = 6;

/// Every variable's bits (by name) after each step.
pub type Trajectory = Vec<Vec<(String, Vec<u32>)>>;

/// Preconditioned from step 2, root inverses every 2 steps; blocks of up
/// to 12 merge (out, in) of the first conv (not nested in channels-last
/// memory) and its 3x3 window (nested).
pub fn config() -> ShampooConfig {
    ShampooConfig::from_json(
        r#"{"lr": 0.02, "betas": [0.9, 0.999], "epsilon": 1e-10, "weight_decay": 1e-3,
            "max_preconditioner_dim": 12, "precondition_frequency": 2,
            "start_preconditioning_step": 2, "momentum": {"momentum": 0.5},
            "grafting": {"type": "adam", "beta2": 0.999, "epsilon": 1e-8}}"#,
    )
    .unwrap()
}

/// Two convolutions and a bias: `sum(conv(tanh(conv(x, c1) + b), c2)^2)`.
pub struct ConvNet {
    pub c1: Tensor,
    pub b: Tensor,
    pub c2: Tensor,
}

impl ConvNet {
    pub fn new(vs: &VarStore) -> ConvNet {
        let p = vs.root();
        let init = tch::nn::Init::Const(0.0);
        ConvNet {
            c1: p.var("c1", &[4, 3, 3, 3], init),
            b: p.var("b", &[4], init),
            c2: p.var("c2", &[6, 4, 3, 3], init),
        }
    }

    pub fn loss(&self, step: usize, device: Device) -> Tensor {
        let x = Tensor::arange(2 * 3 * 7 * 7, (Kind::Float, device))
            .g_mul_scalar(0.37 + step as f64 * 0.11)
            .sin()
            .reshape([2, 3, 7, 7]);
        let h = (x.conv2d(&self.c1, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)
            + self.b.reshape([1, 4, 1, 1]))
        .tanh();
        h.conv2d(&self.c2, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
            .square()
            .mean(None)
    }
}

/// Gives every 4-d variable channels-last strides (same values).
pub fn to_channels_last(vs: &VarStore) {
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            if v.dim() == 4 {
                let cl = v.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
                v.set_data(&cl);
            }
        }
    });
}

pub fn model(device: Device, channels_last: bool) -> (VarStore, ConvNet) {
    let mut vs = VarStore::new(Device::Cpu);
    let m = ConvNet::new(&vs);
    init_fixed(&vs);
    vs.set_device(device);
    if channels_last {
        to_channels_last(&vs);
    }
    (vs, m)
}

/// The weights (logical order, as bits) after every step.
pub fn train(
    device: Device,
    channels_last: bool,
    comm: Option<Arc<dyn Communicator>>,
) -> Trajectory {
    let (vs, m) = model(device, channels_last);
    let mut b = Shampoo::builder(&vs, config()).threads(1);
    if let Some(c) = comm {
        b = b.communicator(c);
    }
    let mut opt = b.build().unwrap();
    (0..STEPS)
        .map(|step| {
            opt.backward_step(&m.loss(step, device)).unwrap();
            bits(&vs)
        })
        .collect()
}

/// A model with contiguous weights and the same model with channels-last
/// weights step in lockstep on the same gradients (the contiguous model's,
/// copied into the other's channels-last gradients: libtorch's convolution
/// backward itself differs in the last bit between the layouts); their
/// weights stay equal bit for bit after every step.
pub fn same_trajectories(device: Device) {
    let (vs_a, m_a) = model(device, false);
    let (vs_b, m_b) = model(device, true);
    let mut opt_a = Shampoo::builder(&vs_a, config())
        .threads(1)
        .build()
        .unwrap();
    let mut opt_b = Shampoo::builder(&vs_b, config())
        .threads(1)
        .build()
        .unwrap();
    let start = bits(&vs_a);
    for step in 0..STEPS {
        opt_a.zero_grad();
        opt_b.zero_grad();
        m_a.loss(step, device).backward();
        m_b.loss(step, device).backward();
        let (va, vb) = (vs_a.variables(), vs_b.variables());
        tch::no_grad(|| {
            for (name, b) in &vb {
                let mut gb = b.grad();
                if b.dim() == 4 {
                    assert_eq!(gb.stride(), b.stride(), "{name}: a channels-last gradient");
                }
                gb.copy_(&va[name].grad());
            }
        });
        opt_a.step().unwrap();
        opt_b.step().unwrap();
        assert_eq!(bits(&vs_b), bits(&vs_a), "step {} on {device:?}", step + 1);
    }
    assert_ne!(bits(&vs_a), start, "the weights moved");
}
