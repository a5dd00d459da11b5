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
fn non_contiguous_variable_is_named() {
    let vs = VarStore::new(Device::Cpu);
    let t = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
    let _ = vs.root().add("t", t, true);
    assert_eq!(
        message(Shampoo::new(&vs, shampoo_config(0.01))),
        r#"variable "t": is not contiguous (a view, or channels-last); create it contiguous"#
    );
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
    // clip_grad_norm cannot return the error: it returns NaN, and the next
    // step returns the error.
    (vs.variables()["a"].shallow_clone() * 2.0)
        .sum(Kind::Float)
        .backward();
    assert!(opt.clip_grad_norm(1.0).is_nan());
    assert_eq!(message(opt.step()), tied);
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
