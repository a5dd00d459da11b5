//! The adapter updates a tch model exactly (bit for bit) as `shampoo_core`
//! does on the same gradients, for one group, several groups with their own
//! configs, and variables added after the optimizer was built.

mod common;

use common::{Mlp, Reference, adam_only_config, loss, shampoo_config};
use shampoo_tch::Shampoo;
use tch::nn::{Init, Module, VarStore};
use tch::{Device, Kind, Tensor};

#[test]
fn one_group_updates_like_shampoo_core_including_missing_gradients() {
    tch::manual_seed(1);
    let vs = VarStore::new(Device::Cpu);
    let mlp = Mlp::new(vs.root());
    // Only used on even steps: on odd steps it has no gradient.
    let extra = vs.root().var("extra", &[3], Init::Const(0.5));
    let names = ["extra", "l1.bias", "l1.weight", "l2.bias", "l2.weight"];
    let mut reference = Reference::new(&vs, shampoo_config(0.01), &names);
    let mut opt = Shampoo::builder(&vs, shampoo_config(0.01))
        .threads(1)
        .build()
        .unwrap();
    for step in 0..7 {
        opt.zero_grad();
        assert!(
            !vs.variables()["l1.weight"].grad().defined(),
            "zero_grad resets gradients to undefined"
        );
        let mut l = loss(&mlp, step, Kind::Float);
        if step % 2 == 0 {
            l += (&extra * &extra).sum(Kind::Float);
        }
        l.backward();
        assert_eq!(vs.variables()["extra"].grad().defined(), step % 2 == 0);
        reference.step(&vs);
        opt.step().unwrap();
        reference.assert_equal(&vs, &format!("step {step}"));
    }
    assert_eq!(reference.opt.step_count(), 7);
    assert_eq!(opt.step_count(0), Some(7));
    assert!(opt.timings().optimizer > std::time::Duration::ZERO);
    assert_eq!(opt.timings().all_reduce, std::time::Duration::ZERO);
}

#[derive(Debug)]
struct TwoLayer {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

impl Module for TwoLayer {
    fn forward(&self, x: &Tensor) -> Tensor {
        (x.matmul(&self.w1.tr()) + &self.b1)
            .tanh()
            .matmul(&self.w2.tr())
            + &self.b2
    }
}

#[test]
fn groups_with_their_own_configs_each_update_like_their_core_optimizer() {
    tch::manual_seed(2);
    let vs = VarStore::new(Device::Cpu);
    let weights = vs.root().set_group(0);
    let biases = vs.root().set_group(1);
    let m = TwoLayer {
        w1: weights.var(
            "w1",
            &[5, 6],
            Init::Randn {
                mean: 0.0,
                stdev: 0.3,
            },
        ),
        b1: biases.var(
            "b1",
            &[5],
            Init::Randn {
                mean: 0.0,
                stdev: 0.1,
            },
        ),
        w2: weights.var(
            "w2",
            &[3, 5],
            Init::Randn {
                mean: 0.0,
                stdev: 0.3,
            },
        ),
        b2: biases.var(
            "b2",
            &[3],
            Init::Randn {
                mean: 0.0,
                stdev: 0.1,
            },
        ),
    };
    let mut ref_w = Reference::new(&vs, shampoo_config(0.01), &["w1", "w2"]);
    let mut ref_b = Reference::new(&vs, adam_only_config(0.02), &["b1", "b2"]);
    let mut opt = Shampoo::builder(&vs, shampoo_config(0.01))
        .group(1, adam_only_config(0.02))
        .threads(1)
        .build()
        .unwrap();
    assert_eq!(opt.groups(), vec![0, 1]);
    for step in 0..6 {
        if step == 3 {
            opt.set_lr_group(1, 0.005).unwrap();
            ref_b.opt.set_lr(0.005).unwrap();
        }
        if step == 4 {
            opt.set_lr(0.003).unwrap();
            ref_w.opt.set_lr(0.003).unwrap();
            ref_b.opt.set_lr(0.003).unwrap();
        }
        let l = loss(&m, step, Kind::Float);
        opt.backward_step(&l).unwrap();
        // The step leaves the gradients as they are: the references use them.
        ref_w.step(&vs);
        ref_b.step(&vs);
        ref_w.assert_equal(&vs, &format!("weights, step {step}"));
        ref_b.assert_equal(&vs, &format!("biases, step {step}"));
    }
    assert_eq!(opt.config(1).lr, 0.003);
}

#[test]
fn variables_added_after_construction_are_picked_up_and_earlier_state_carries_over() {
    tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let a = Mlp::new(vs.root() / "a");
    let names_a = ["a.l1.bias", "a.l1.weight", "a.l2.bias", "a.l2.weight"];
    let mut ref_a = Reference::new(&vs, shampoo_config(0.01), &names_a);
    let mut opt = Shampoo::builder(&vs, shampoo_config(0.01))
        .threads(1)
        .build()
        .unwrap();
    for step in 0..3 {
        opt.zero_grad();
        loss(&a, step, Kind::Float).backward();
        ref_a.step(&vs);
        opt.step().unwrap();
        ref_a.assert_equal(&vs, &format!("before the new layer, step {step}"));
    }
    let b = Mlp::new(vs.root() / "b");
    let names_b = ["b.l1.bias", "b.l1.weight", "b.l2.bias", "b.l2.weight"];
    let mut ref_b = Reference::new(&vs, shampoo_config(0.01), &names_b);
    for step in 3..7 {
        opt.zero_grad();
        (loss(&a, step, Kind::Float) + loss(&b, step, Kind::Float)).backward();
        ref_a.step(&vs);
        ref_b.step(&vs);
        opt.step().unwrap();
        ref_a.assert_equal(&vs, &format!("old layer, step {step}"));
        ref_b.assert_equal(&vs, &format!("new layer, step {step}"));
    }
    assert_eq!(opt.step_count(0), Some(7));
}

#[test]
fn clip_grad_norm_returns_the_norm_and_scales_like_torch() {
    tch::manual_seed(4);
    let vs = VarStore::new(Device::Cpu);
    let mlp = Mlp::new(vs.root());
    let names = ["l1.bias", "l1.weight", "l2.bias", "l2.weight"];
    let mut opt = Shampoo::builder(&vs, shampoo_config(0.01))
        .threads(1)
        .build()
        .unwrap();
    opt.zero_grad();
    loss(&mlp, 0, Kind::Float).backward();
    let before: Vec<Vec<f32>> = common::snapshot(&vs, &names)
        .into_iter()
        .map(|s| s.1.unwrap())
        .collect();
    let norm: f64 = before
        .iter()
        .map(|g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    assert!(norm > 0.0);

    // Above the norm: nothing changes.
    assert_eq!(opt.clip_grad_norm(norm * 2.0).unwrap(), norm);
    let same: Vec<Vec<f32>> = common::snapshot(&vs, &names)
        .into_iter()
        .map(|s| s.1.unwrap())
        .collect();
    assert_eq!(same, before);

    // Below: every gradient is scaled by max / (norm + 1e-6).
    let max = norm / 4.0;
    assert_eq!(opt.clip_grad_norm(max).unwrap(), norm);
    let c = (max / (norm + 1e-6)) as f32;
    let after: Vec<Vec<f32>> = common::snapshot(&vs, &names)
        .into_iter()
        .map(|s| s.1.unwrap())
        .collect();
    let want: Vec<Vec<f32>> = before
        .iter()
        .map(|g| g.iter().map(|&x| x * c).collect())
        .collect();
    assert_eq!(after, want);

    // Clipping values clamps each element to [-max, max], as tch's
    // clip_grad_value does.
    let v = after.iter().flatten().map(|x| x.abs()).fold(0f32, f32::max) / 2.0;
    opt.clip_grad_value(v as f64).unwrap();
    let clamped: Vec<Vec<f32>> = common::snapshot(&vs, &names)
        .into_iter()
        .map(|s| s.1.unwrap())
        .collect();
    let want: Vec<Vec<f32>> = after
        .iter()
        .map(|g| g.iter().map(|&x| x.clamp(-v, v)).collect())
        .collect();
    assert_eq!(clamped, want);
    assert!(clamped.iter().flatten().any(|&x| x == v || x == -v));
}

/// tch's names, tch's semantics: `backward_step_clip` clips values,
/// `backward_step_clip_norm` clips the norm; each equals clipping by hand
/// between `backward` and `step`.
#[test]
fn backward_step_clip_clips_values_and_backward_step_clip_norm_the_norm() {
    let run = |how: &dyn Fn(&mut Shampoo, &Tensor)| {
        // Fixed weights: libtorch's seed is global, and other tests of this
        // binary draw from it concurrently.
        let vs = VarStore::new(Device::Cpu);
        let mlp = Mlp::new(vs.root());
        common::init_fixed(&vs);
        let mut opt = Shampoo::builder(&vs, shampoo_config(0.01))
            .threads(1)
            .build()
            .unwrap();
        for step in 0..3 {
            how(&mut opt, &loss(&mlp, step, Kind::Float));
        }
        common::bits(&vs)
    };
    let values = run(&|o, l| o.backward_step_clip(l, 0.01).unwrap());
    let by_hand = run(&|o, l| {
        o.zero_grad();
        l.backward();
        o.clip_grad_value(0.01).unwrap();
        o.step().unwrap();
    });
    assert_eq!(values, by_hand);
    let norm = run(&|o, l| o.backward_step_clip_norm(l, 0.01).unwrap());
    let by_hand = run(&|o, l| {
        o.zero_grad();
        l.backward();
        o.clip_grad_norm(0.01).unwrap();
        o.step().unwrap();
    });
    assert_eq!(norm, by_hand);
    assert_ne!(values, norm);
}

#[test]
fn double_precision_variables_update_like_shampoo_core_in_f64() {
    use shampoo_core::{CpuBackend, DType, HostView, HostViewMut};
    let vs = VarStore::new(Device::Cpu);
    let w = vs.root().add(
        "w",
        Tensor::arange(12, (Kind::Double, Device::Cpu))
            .reshape([3, 4])
            .sin(),
        true,
    );
    let mut opt = Shampoo::builder(&vs, shampoo_config(0.01))
        .threads(1)
        .build()
        .unwrap();
    let mut reference = shampoo_core::Shampoo::new(
        shampoo_config(0.01),
        &[vec![3, 4]],
        DType::F64,
        CpuBackend::new(1).unwrap(),
    )
    .unwrap();
    let mut want = common::host64(&w);
    for step in 0..5 {
        opt.zero_grad();
        let target = Tensor::from(step as f64 * 0.1);
        (&w - target).square().sum(Kind::Double).backward();
        let g = common::host64(&w.grad());
        reference
            .step(
                &mut [HostViewMut::F64(&mut want)],
                &[Some(HostView::F64(&g))],
            )
            .unwrap();
        opt.step().unwrap();
        let got = common::host64(&w);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "step {step}");
    }
}

#[test]
fn the_optimizer_can_move_to_another_thread() {
    fn is_send<T: Send>() {}
    is_send::<Shampoo>();
}

#[test]
fn scalar_variables_update_like_shampoo_core() {
    let vs = VarStore::new(Device::Cpu);
    let s = vs.root().var("s", &[], Init::Const(0.75));
    let w = vs.root().var("w", &[4], Init::Const(0.5));
    let mut reference = Reference::new(&vs, shampoo_config(0.01), &["s", "w"]);
    let mut opt = Shampoo::builder(&vs, shampoo_config(0.01))
        .threads(1)
        .build()
        .unwrap();
    for step in 0..4 {
        opt.zero_grad();
        ((&w * &s).sum(Kind::Float) - step as f64)
            .square()
            .backward();
        reference.step(&vs);
        opt.step().unwrap();
        reference.assert_equal(&vs, &format!("step {step}"));
    }
}

#[test]
fn a_variable_that_changes_shape_restarts_its_group_with_fresh_state() {
    let vs = VarStore::new(Device::Cpu);
    let a = vs.root().var("a", &[2, 3], Init::Const(0.25));
    let mut w = vs.root().var("w", &[3], Init::Const(0.5));
    let mut opt = Shampoo::builder(&vs, shampoo_config(0.01))
        .threads(1)
        .build()
        .unwrap();
    for step in 0..3 {
        opt.zero_grad();
        (a.matmul(&w).sum(Kind::Float) - step as f64)
            .square()
            .backward();
        opt.step().unwrap();
    }
    assert_eq!(opt.step_count(0), Some(3));
    // `w` grows to 4 elements and `a` follows: both restart.
    tch::no_grad(|| {
        w.set_data(&Tensor::full([4], 0.5, (Kind::Float, Device::Cpu)));
        let mut a2 = a.shallow_clone();
        a2.set_data(&Tensor::full([2, 4], 0.25, (Kind::Float, Device::Cpu)));
    });
    let mut reference = Reference::new(&vs, shampoo_config(0.01), &["a", "w"]);
    for step in 0..3 {
        opt.zero_grad();
        (a.matmul(&w).sum(Kind::Float) - step as f64)
            .square()
            .backward();
        reference.step(&vs);
        opt.step().unwrap();
        reference.assert_equal(&vs, &format!("after the change, step {step}"));
    }
    assert_eq!(opt.step_count(0), Some(3));
}

#[test]
fn the_evaluation_view_of_iterate_averaging_matches_shampoo_core() {
    tch::manual_seed(4);
    let vs = VarStore::new(Device::Cpu);
    let mlp = Mlp::new(vs.root());
    let names = ["l1.bias", "l1.weight", "l2.bias", "l2.weight"];
    let mut config = shampoo_config(0.01);
    config.iterate_averaging = Some(shampoo_core::config::IterateAveraging::ScheduleFree {
        train_interp_coeff: 0.9,
        eval_coeff_lr_power: 2.0,
    });
    let mut reference = Reference::new(&vs, config.clone(), &names);
    let mut opt = Shampoo::builder(&vs, config).threads(1).build().unwrap();
    let switch = |r: &mut Reference, to_eval: bool| {
        let mut p: Vec<shampoo_core::HostViewMut<'_>> = r
            .params
            .iter_mut()
            .map(|p| shampoo_core::HostViewMut::F32(p))
            .collect();
        if to_eval {
            r.opt.eval(&mut p).unwrap();
        } else {
            r.opt.train(&mut p).unwrap();
        }
    };
    for step in 0..6 {
        opt.zero_grad();
        loss(&mlp, step, Kind::Float).backward();
        reference.step(&vs);
        opt.step().unwrap();
        reference.assert_equal(&vs, &format!("step {step}"));
        if step % 3 == 2 {
            opt.eval().unwrap();
            assert!(!opt.is_train_mode());
            switch(&mut reference, true);
            reference.assert_equal(&vs, &format!("eval view after step {step}"));
            // Evaluating the model changes nothing; a step is refused.
            let _ = loss(&mlp, 99, Kind::Float);
            opt.zero_grad();
            loss(&mlp, step, Kind::Float).backward();
            let e = opt.step().unwrap_err().to_string();
            assert!(e.contains("call train() before step()"), "{e}");
            opt.train().unwrap();
            assert!(opt.is_train_mode());
            switch(&mut reference, false);
            reference.assert_equal(&vs, &format!("train after step {step}"));
        }
    }
}
