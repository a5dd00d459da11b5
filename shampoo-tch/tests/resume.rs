//! Saving and loading the optimizer state: a resumed run continues bit for
//! bit, and a checkpoint that does not fit is refused with a clear message.

mod common;

use common::{Mlp, adam_only_config, loss, shampoo_config};
use shampoo_tch::Shampoo;
use tch::nn::{Init, Module, VarStore};
use tch::{Device, Kind, Tensor};

/// Layer `a` and a scalar-ish `scale` (group 1) from the start; layer `b`
/// (group 0) only when `with_b`.
struct Model {
    a: Mlp,
    scale: Tensor,
    b: Option<Mlp>,
}

impl Model {
    fn new(vs: &VarStore) -> Model {
        Model {
            a: Mlp::new(vs.root().set_group(0) / "a"),
            scale: vs.root().set_group(1).var("scale", &[3], Init::Const(1.0)),
            b: None,
        }
    }
    fn add_b(&mut self, vs: &VarStore) {
        self.b = Some(Mlp::new(vs.root().set_group(0) / "b"));
    }
    fn loss(&self, step: i64) -> Tensor {
        let (x, y) = common::batch(step, Kind::Float);
        let l = (self.a.forward(&x) * &self.scale - y).square().mean(None);
        match &self.b {
            Some(b) => l + loss(b, step, Kind::Float),
            None => l,
        }
    }
}

fn optimizer(vs: &VarStore) -> Shampoo {
    Shampoo::builder(vs, shampoo_config(0.01))
        .group(1, adam_only_config(0.02))
        .threads(1)
        .build()
        .unwrap()
}

#[test]
fn a_resumed_run_continues_bit_for_bit() {
    tch::manual_seed(6);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("optimizer");

    let vs = VarStore::new(Device::Cpu);
    let mut model = Model::new(&vs);
    let mut opt = optimizer(&vs);
    // A second copy of the model, to restart from the saved weights.
    let mut vs2 = VarStore::new(Device::Cpu);
    let mut model2 = Model::new(&vs2);
    for step in 0..7 {
        if step == 2 {
            // Added after construction: the saved state has two segments.
            model.add_b(&vs);
            model2.add_b(&vs2);
        }
        if step == 4 {
            opt.save(&ckpt).unwrap();
            vs2.copy(&vs).unwrap();
            // Saving again replaces the directory as a whole.
            opt.save(&ckpt).unwrap();
        }
        opt.set_lr(0.01 / (step + 1) as f64).unwrap();
        opt.backward_step(&model.loss(step)).unwrap();
    }
    assert!(ckpt.join("manifest.json").is_file());
    assert!(!dir.path().join("optimizer.tmp").exists());
    assert!(!dir.path().join("optimizer.old").exists());

    let mut opt2 = optimizer(&vs2);
    opt2.load(&ckpt).unwrap();
    assert_eq!(opt2.step_count(0), Some(4));
    assert_eq!(opt2.step_count(1), Some(4));
    for step in 4..7 {
        opt2.set_lr(0.01 / (step + 1) as f64).unwrap();
        opt2.backward_step(&model2.loss(step)).unwrap();
    }
    assert_eq!(common::bits(&vs2), common::bits(&vs));
}

#[test]
fn a_checkpoint_of_another_model_is_refused_and_changes_nothing() {
    tch::manual_seed(7);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("optimizer");
    let vs = VarStore::new(Device::Cpu);
    let model = Model::new(&vs);
    let mut opt = optimizer(&vs);
    opt.backward_step(&model.loss(0)).unwrap();
    opt.save(&ckpt).unwrap();

    let other = VarStore::new(Device::Cpu);
    let m = Mlp::new(other.root() / "other");
    let mut opt_other = Shampoo::new(&other, shampoo_config(0.01)).unwrap();
    opt_other.backward_step(&loss(&m, 0, Kind::Float)).unwrap();
    let e = opt_other.load(&ckpt).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "optimizer checkpoint {}: variable \"a.l1.bias\" (group 0) is not a trainable variable of the VarStore",
            ckpt.display()
        )
    );
    assert_eq!(opt_other.step_count(0), Some(1));

    // The same model with another group layout.
    let regrouped = VarStore::new(Device::Cpu);
    let _a = Mlp::new(regrouped.root() / "a");
    let _s = regrouped
        .root()
        .set_group(2)
        .var("scale", &[3], Init::Const(1.0));
    let mut opt_r = Shampoo::new(&regrouped, shampoo_config(0.01)).unwrap();
    assert_eq!(
        opt_r.load(&ckpt).unwrap_err().to_string(),
        format!(
            "optimizer checkpoint {}: variable \"scale\" is in group 2 of the VarStore but in group 1 of the checkpoint",
            ckpt.display()
        )
    );

    // The same model with another shape.
    let reshaped = VarStore::new(Device::Cpu);
    let _a = Mlp::new(reshaped.root().set_group(0) / "a");
    let _s = reshaped
        .root()
        .set_group(1)
        .var("scale", &[4], Init::Const(1.0));
    let mut opt_s = optimizer(&reshaped);
    assert_eq!(
        opt_s.load(&ckpt).unwrap_err().to_string(),
        format!(
            "optimizer checkpoint {}: variable \"scale\" is f32 [4] in the VarStore but f32 [3] in the checkpoint",
            ckpt.display()
        )
    );

    // Another config: shampoo_core says which key differs.
    let vs3 = VarStore::new(Device::Cpu);
    let _m3 = Model::new(&vs3);
    let mut other_betas = shampoo_config(0.01);
    other_betas.betas = [0.95, 0.999];
    let mut opt3 = Shampoo::builder(&vs3, other_betas)
        .group(1, adam_only_config(0.02))
        .build()
        .unwrap();
    let e = opt3.load(&ckpt).unwrap_err().to_string();
    assert!(e.contains("betas"), "unexpected message: {e}");
    assert_eq!(opt3.step_count(0), Some(0));

    // No checkpoint at all.
    let missing = dir.path().join("missing");
    assert_eq!(
        opt.load(&missing).unwrap_err().to_string(),
        format!(
            "{}: No such file or directory (os error 2)",
            missing.join("manifest.json").display()
        )
    );
    assert_eq!(opt.step_count(0), Some(1));
}
