//! Helpers shared by the integration tests: a small tch model, copies of
//! variables and gradients to host vectors, and reference optimizers from
//! `shampoo_core` run on those copies.
#![allow(dead_code)]

pub mod channels_last;

use shampoo_core::{CpuBackend, DType, HostView, HostViewMut, ShampooConfig};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

/// A config that preconditions early, so a few steps exercise everything:
/// statistics, root inverses, grafting, momentum-free filtering.
pub fn shampoo_config(lr: f64) -> ShampooConfig {
    ShampooConfig::from_json(&format!(
        r#"{{"lr": {lr}, "betas": [0.9, 0.999], "epsilon": 1e-10, "weight_decay": 1e-4,
            "max_preconditioner_dim": 4, "precondition_frequency": 2,
            "start_preconditioning_step": 2,
            "grafting": {{"type": "adam", "beta2": 0.999, "epsilon": 1e-8}}}}"#
    ))
    .unwrap()
}

/// Adam grafting only: never preconditioned.
pub fn adam_only_config(lr: f64) -> ShampooConfig {
    ShampooConfig::from_json(&format!(
        r#"{{"lr": {lr}, "betas": [0.9, 0.999], "epsilon": 1e-10,
            "start_preconditioning_step": "never",
            "grafting": {{"type": "adam", "beta2": 0.999, "epsilon": 1e-8}}}}"#
    ))
    .unwrap()
}

/// Two linear layers (6 -> 5 -> 3) under `prefix`, in `group`.
#[derive(Debug)]
pub struct Mlp {
    pub l1: nn::Linear,
    pub l2: nn::Linear,
}

impl Mlp {
    pub fn new(p: nn::Path<'_>) -> Mlp {
        Mlp {
            l1: nn::linear(&p / "l1", 6, 5, Default::default()),
            l2: nn::linear(&p / "l2", 5, 3, Default::default()),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.l2.forward(&self.l1.forward(x).tanh())
    }
}

/// A fixed batch for step `step`.
pub fn batch(step: i64, kind: Kind) -> (Tensor, Tensor) {
    let x = Tensor::arange(8 * 6, (kind, Device::Cpu))
        .reshape([8, 6])
        .g_mul_scalar((step + 1) as f64 * 0.37)
        .sin();
    let y = Tensor::arange(8 * 3, (kind, Device::Cpu))
        .reshape([8, 3])
        .g_mul_scalar((step + 2) as f64 * 0.11)
        .cos();
    (x, y)
}

/// The loss of `m` on the batch of step `step`.
pub fn loss(m: &impl Module, step: i64, kind: Kind) -> Tensor {
    let (x, y) = batch(step, kind);
    (m.forward(&x) - y).square().mean(None)
}

/// A tensor's values.
pub fn host(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.detach().to(Device::Cpu).reshape([-1])).unwrap()
}

/// A tensor's values (f64).
pub fn host64(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.detach().reshape([-1])).unwrap()
}

/// A variable's values, its gradient (if defined) and its shape.
pub type Snapshot = (Vec<f32>, Option<Vec<f32>>, Vec<usize>);

/// Trainable variables of `vs` whose name is in `names`, in that order:
/// (values, gradient or None, shape).
pub fn snapshot(vs: &VarStore, names: &[&str]) -> Vec<Snapshot> {
    let vars = vs.variables();
    names
        .iter()
        .map(|n| {
            let t = &vars[*n];
            let g = t.grad();
            let shape = t.size().iter().map(|&d| d as usize).collect();
            (host(t), g.defined().then(|| host(&g)), shape)
        })
        .collect()
}

/// A `shampoo_core` optimizer on host vectors, as the adapter should be.
pub struct Reference {
    pub opt: shampoo_core::Shampoo<CpuBackend>,
    pub names: Vec<String>,
    pub params: Vec<Vec<f32>>,
}

impl Reference {
    /// Starts from the current values of `names` (sorted as the adapter sorts).
    pub fn new(vs: &VarStore, config: ShampooConfig, names: &[&str]) -> Reference {
        let snap = snapshot(vs, names);
        let shapes: Vec<Vec<usize>> = snap.iter().map(|s| s.2.clone()).collect();
        let opt =
            shampoo_core::Shampoo::new(config, &shapes, DType::F32, CpuBackend::new(1).unwrap())
                .unwrap();
        Reference {
            opt,
            names: names.iter().map(|s| s.to_string()).collect(),
            params: snap.into_iter().map(|s| s.0).collect(),
        }
    }

    /// One core step with the gradients the variables of `vs` hold now.
    pub fn step(&mut self, vs: &VarStore) {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        let grads: Vec<Option<Vec<f32>>> = snapshot(vs, &names).into_iter().map(|s| s.1).collect();
        let mut p: Vec<HostViewMut<'_>> = self
            .params
            .iter_mut()
            .map(|p| HostViewMut::F32(p))
            .collect();
        let g: Vec<Option<HostView<'_>>> = grads
            .iter()
            .map(|g| g.as_deref().map(HostView::F32))
            .collect();
        self.opt.step(&mut p, &g).unwrap();
    }

    /// Asserts that the variables of `vs` equal the reference bit for bit.
    pub fn assert_equal(&self, vs: &VarStore, what: &str) {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        for ((name, want), got) in names.iter().zip(&self.params).zip(snapshot(vs, &names)) {
            let want_bits: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
            let got_bits: Vec<u32> = got.0.iter().map(|x| x.to_bits()).collect();
            assert_eq!(
                got_bits, want_bits,
                "{what}: variable {name} differs from shampoo_core"
            );
        }
    }
}

impl Reference {
    /// One core step with the given gradients (in the order of `names`).
    pub fn step_with(&mut self, grads: &[Option<Vec<f32>>]) {
        let mut p: Vec<HostViewMut<'_>> = self
            .params
            .iter_mut()
            .map(|p| HostViewMut::F32(p))
            .collect();
        let g: Vec<Option<HostView<'_>>> = grads
            .iter()
            .map(|g| g.as_deref().map(HostView::F32))
            .collect();
        self.opt.step(&mut p, &g).unwrap();
    }

    /// Writes the reference's values into the variables of `vs`.
    pub fn write_back(&self, vs: &VarStore) {
        let vars = vs.variables();
        tch::no_grad(|| {
            for (name, p) in self.names.iter().zip(&self.params) {
                let mut t = vars[name].shallow_clone();
                t.copy_(&Tensor::from_slice(p).reshape(t.size()));
            }
        });
    }
}

/// Sets every variable of `vs` to fixed values (no random generator, so
/// threads building the same model get the same weights).
pub fn init_fixed(vs: &VarStore) {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (i, (_, t)) in vars.iter_mut().enumerate() {
            let v = Tensor::arange(t.numel() as i64, (t.kind(), Device::Cpu))
                .g_mul_scalar(0.7 + i as f64)
                .sin()
                .g_mul_scalar(0.4)
                .reshape(t.size());
            t.copy_(&v);
        }
    });
}

/// Every variable of `vs` by name, as bits.
pub fn bits(vs: &VarStore) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<(String, Vec<u32>)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, host(&t).iter().map(|x| x.to_bits()).collect()))
        .collect();
    v.sort();
    v
}

/// Weights in group 0, biases in group 1: `tanh(x W1^T + b1) W2^T + b2`.
#[derive(Debug)]
pub struct TwoLayer {
    pub w1: Tensor,
    pub b1: Tensor,
    pub w2: Tensor,
    pub b2: Tensor,
}

impl TwoLayer {
    pub fn new(vs: &VarStore) -> TwoLayer {
        let w = vs.root().set_group(0);
        let b = vs.root().set_group(1);
        let init = nn::Init::Const(0.0);
        TwoLayer {
            w1: w.var("w1", &[5, 6], init),
            b1: b.var("b1", &[5], init),
            w2: w.var("w2", &[3, 5], init),
            b2: b.var("b2", &[3], init),
        }
    }
}

impl Module for TwoLayer {
    fn forward(&self, x: &Tensor) -> Tensor {
        (x.matmul(&self.w1.tr()) + &self.b1)
            .tanh()
            .matmul(&self.w2.tr())
            + &self.b2
    }
}
