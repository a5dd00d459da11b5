//! Bad inputs are errors that say what is wrong, never panics.

mod common;

use common::{Mlp, loss, shampoo_config};
use shampoo_tch::Shampoo;
use tch::nn::{Init, VarStore};
use tch::{Device, Kind, Tensor};

fn message(r: shampoo_tch::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_dtype_is_named() {
    let vs = VarStore::new(Device::Cpu);
    let _ = vs
        .root()
        .add("h", Tensor::zeros([3], (Kind::Half, Device::Cpu)), true);
    assert_eq!(
        message(Shampoo::new(&vs, shampoo_config(0.01))),
        r#"variable "h": has dtype Half; only Float (f32) and Double (f64) are supported"#
    );
}

#[test]
fn a_variable_with_gaps_is_named_with_its_strides() {
    // A slice of a wider tensor leaves gaps between its rows: refused. A
    // transposed (column-major) one is dense, and is read in place.
    let vs = VarStore::new(Device::Cpu);
    let t = Tensor::zeros([3, 8], (Kind::Float, Device::Cpu)).narrow(1, 0, 4);
    let _ = vs.root().add("t", t, true);
    assert_eq!(
        message(Shampoo::new(&vs, shampoo_config(0.01))),
        r#"variable "t": has strides [8, 1] for shape [3, 4]: its elements overlap or leave gaps (a view?); only dense layouts (contiguous, channels-last, any permutation of the dimensions) are supported; make it contiguous"#
    );
    let vs = VarStore::new(Device::Cpu);
    let t = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
    let _ = vs.root().add("t", t, true);
    assert!(Shampoo::new(&vs, shampoo_config(0.01)).is_ok());
}

#[test]
fn mixed_dtypes_in_one_group_are_refused() {
    let vs = VarStore::new(Device::Cpu);
    let _ = vs
        .root()
        .add("a", Tensor::zeros([3], (Kind::Float, Device::Cpu)), true);
    let _ = vs
        .root()
        .add("b", Tensor::zeros([3], (Kind::Double, Device::Cpu)), true);
    assert_eq!(
        message(Shampoo::new(&vs, shampoo_config(0.01))),
        r#"parameter group 0: mixes f32 variable "a" and f64 variable "b"; put variables of different dtypes in different groups"#
    );
}

#[test]
fn tied_variables_are_refused() {
    let vs = VarStore::new(Device::Cpu);
    let t = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    let _ = vs.root().add("a", t.shallow_clone(), true);
    let _ = vs.root().add("b", t.shallow_clone(), true);
    let mut opt = Shampoo::new(&vs, shampoo_config(0.01)).unwrap();
    let tied = r#"variable "b": shares memory with variable "a" (or a gradient does); tied or aliased variables are not supported"#;
    assert_eq!(message(opt.step()), tied);
    // Clipping returns the error itself and scales nothing.
    (vs.variables()["a"].shallow_clone() * 2.0)
        .sum(Kind::Float)
        .backward();
    assert_eq!(message(opt.clip_grad_norm(1.0)), tied);
    assert_eq!(message(opt.clip_grad_value(1.0)), tied);
    assert_eq!(common::host(&vs.variables()["a"].grad()), vec![2.0; 3]);
    assert_eq!(message(opt.step()), tied);
    assert_eq!(
        message(opt.clip_grad_norm(f64::NAN)),
        "optimizer options: clip_grad_norm: max_norm must be finite and >= 0, got NaN"
    );
}

/// A step with a NaN gradient for `w` (and a finite one for `v`): its
/// outcome. `w` and `v` are one block each (on two ranks, one per rank).
fn nan_step(
    comm: Option<std::sync::Arc<dyn shampoo_dist::Communicator>>,
    nan_v: bool,
) -> shampoo_tch::Result<()> {
    let vs = VarStore::new(Device::Cpu);
    let w = vs.root().var("w", &[4, 4], Init::Const(0.5));
    let v = vs.root().var("v", &[4, 4], Init::Const(0.5));
    let config = shampoo_core::ShampooConfig::from_json(
        r#"{"lr": 0.01, "precondition_frequency": 1, "start_preconditioning_step": 1}"#,
    )
    .unwrap();
    let mut b = Shampoo::builder(&vs, config);
    if let Some(c) = comm {
        b = b.communicator(c);
    }
    let mut opt = b.build().unwrap();
    let nan = Tensor::full([4, 4], f64::NAN, (Kind::Float, Device::Cpu));
    let gv = if nan_v {
        &nan * &v
    } else {
        v.shallow_clone() * 2.0
    };
    ((&w * &nan).sum(Kind::Float) + gv.sum(Kind::Float)).backward();
    opt.step()
}

fn on_two_ranks(nan_v: bool) -> Vec<shampoo_tch::Result<()>> {
    let comms = shampoo_dist::in_process(2, &shampoo_dist::CommOptions::default());
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(move || nan_step(Some(c), nan_v)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_non_finite_value_is_the_same_flat_core_error_on_one_process_and_on_ranks() {
    use shampoo_tch::Error;
    let mut all = vec![nan_step(None, true)];
    all.extend(on_two_ranks(true));
    for r in &all {
        assert!(
            matches!(r, Err(Error::Core(shampoo_core::Error::NonFinite { .. }))),
            "{r:?}"
        );
    }
}

#[test]
fn a_rank_whose_block_fails_still_joins_the_step_so_the_others_finish_it() {
    // Only `w`'s rank sees the NaN; the other rank ends the step at once
    // (not at the collective timeout).
    let t = std::time::Instant::now();
    let r = on_two_ranks(false);
    assert!(t.elapsed() < std::time::Duration::from_secs(30));
    assert_eq!(r.iter().filter(|r| r.is_ok()).count(), 1, "{r:?}");
    assert!(
        r.iter().any(|r| matches!(
            r,
            Err(shampoo_tch::Error::Core(
                shampoo_core::Error::NonFinite { .. }
            ))
        )),
        "{r:?}"
    );
}

#[test]
fn a_gradient_on_some_ranks_only_names_the_variable_and_the_step() {
    let comms = shampoo_dist::in_process(2, &shampoo_dist::CommOptions::default());
    let errs: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let rank = c.rank();
                    let vs = VarStore::new(Device::Cpu);
                    let m = Mlp::new(vs.root());
                    let extra = vs.root().var("extra", &[3], Init::Const(0.5));
                    let mut opt = Shampoo::builder(&vs, shampoo_config(0.01))
                        .communicator(c)
                        .build()
                        .unwrap();
                    let both = loss(&m, 0, Kind::Float) + extra.sum(Kind::Float);
                    opt.backward_step(&both).unwrap();
                    // Step 2: `extra` takes part on rank 0 only.
                    let l = if rank == 0 {
                        loss(&m, 1, Kind::Float) + extra.sum(Kind::Float)
                    } else {
                        loss(&m, 1, Kind::Float)
                    };
                    opt.zero_grad();
                    l.backward();
                    message(opt.step())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in errs {
        assert_eq!(
            e,
            r#"variable "extra": had a gradient on 1 of 2 ranks at step 2; every rank needs a gradient for it, or none"#
        );
    }
}

#[test]
fn a_variable_added_later_in_an_unsupported_dtype_fails_the_step_and_changes_nothing() {
    tch::manual_seed(5);
    let vs = VarStore::new(Device::Cpu);
    let mlp = Mlp::new(vs.root());
    let mut opt = Shampoo::new(&vs, shampoo_config(0.01)).unwrap();
    let _ = vs.root().add(
        "late",
        Tensor::zeros([2], (Kind::Int64, Device::Cpu)),
        false,
    );
    let _ = vs.root().var("late_half", &[2], Init::Const(1.0));
    let mut vs_half = vs.variables()["late_half"].shallow_clone();
    vs_half.set_data(&Tensor::zeros([2], (Kind::BFloat16, Device::Cpu)));
    opt.zero_grad();
    loss(&mlp, 0, Kind::Float).backward();
    let before = common::snapshot(&vs, &["l1.weight"]);
    assert_eq!(
        message(opt.step()),
        r#"variable "late_half": has dtype BFloat16; only Float (f32) and Double (f64) are supported"#
    );
    assert_eq!(common::snapshot(&vs, &["l1.weight"]), before);
}

#[test]
fn bad_learning_rates_and_unknown_groups_are_refused() {
    let vs = VarStore::new(Device::Cpu);
    let _mlp = Mlp::new(vs.root());
    let mut opt = Shampoo::new(&vs, shampoo_config(0.01)).unwrap();
    assert_eq!(
        message(opt.set_lr(-1.0)),
        "invalid config: lr must be finite and >= 0, got -1"
    );
    assert_eq!(
        message(opt.set_lr_group(7, 0.1)),
        "parameter group 7: no such group (groups: [0])"
    );
    assert_eq!(opt.config(0).lr, 0.01);
}

#[test]
fn an_invalid_group_config_is_refused_at_build() {
    let vs = VarStore::new(Device::Cpu);
    let _mlp = Mlp::new(vs.root());
    let mut bad = shampoo_config(0.01);
    bad.epsilon = -1.0;
    let e = message(
        Shampoo::builder(&vs, shampoo_config(0.01))
            .group(2, bad)
            .build(),
    );
    assert!(
        e.starts_with("parameter group 2: invalid config: "),
        "unexpected message: {e}"
    );
}

#[test]
fn a_failing_backward_is_an_error() {
    let vs = VarStore::new(Device::Cpu);
    let _mlp = Mlp::new(vs.root());
    let mut opt = Shampoo::new(&vs, shampoo_config(0.01)).unwrap();
    // A loss that does not require gradients cannot be back-propagated.
    let loss = Tensor::from(1.0f32);
    assert_eq!(
        message(opt.backward_step(&loss)),
        "libtorch: element 0 of tensors does not require grad and does not have a grad_fn"
    );
}
