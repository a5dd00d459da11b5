//! End-to-end training on small subsets: metrics, baselines, resume.

mod common;

use common::{assert_same_weights, tiny, torch_lock};
use shampoo_core::ShampooConfig;
use shampoo_core::config::{Grafting, StartStep, WeightDecayType};
use shampoo_train::comm::Communicator;
use shampoo_train::metrics::read_records;
use shampoo_train::optim::{AdamW, OptimizerKind};
use shampoo_train::plot::{Run, compare, plot};
use shampoo_train::train::{PROTOCOL_SHAMPOO, TrainConfig};
use std::sync::Arc;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

fn single() -> Arc<dyn Communicator> {
    shampoo_train::comm::single()
}

#[test]
fn adamw_run_learns_and_writes_metrics_and_summary() {
    let _g = torch_lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(OptimizerKind::Adamw, dir.path());
    let s = shampoo_train::train::run(&cfg, single()).unwrap();
    assert_eq!(s.steps, 16);
    assert_eq!(s.world_size, 1);
    // A tenth of the images is chance; 16 AdamW steps get well past it.
    assert!(s.test_acc > 0.5, "test accuracy {}", s.test_acc);
    let recs = read_records(&dir.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = recs
        .iter()
        .filter(|r| r.kind == "step")
        .map(|r| r.step)
        .collect();
    assert_eq!(steps, (1..=16).collect::<Vec<_>>());
    let evals: Vec<u64> = recs
        .iter()
        .filter(|r| r.kind == "eval")
        .map(|r| r.step)
        .collect();
    assert_eq!(evals, vec![8, 16]);
    let epochs: Vec<u64> = recs
        .iter()
        .filter(|r| r.kind == "epoch")
        .map(|r| r.step)
        .collect();
    assert_eq!(epochs, vec![8, 16]);
    let last_eval = recs.iter().rfind(|r| r.kind == "eval").unwrap();
    assert_eq!(last_eval.test_acc, Some(s.test_acc));
    let summary = shampoo_train::train::read_summary(dir.path()).unwrap();
    assert_eq!(summary, s);
    assert!(dir.path().join("checkpoint/model.ot").exists());
    assert!(!dir.path().join("checkpoint.tmp").exists());
}

#[test]
fn adamw_follows_libtorch_adamw() {
    let _g = torch_lock();
    tch::manual_seed(3);
    let x = Tensor::randn([16, 12], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([16, 5], (Kind::Float, Device::Cpu));
    let make = || {
        tch::manual_seed(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root() / "l", 12, 5, Default::default());
        (vs, lin)
    };
    let (vs_ref, lin_ref) = make();
    let (vs, lin) = make();
    let mut reference = nn::AdamW {
        beta1: 0.9,
        beta2: 0.99,
        wd: 0.05,
        eps: 1e-8,
        amsgrad: false,
    }
    .build(&vs_ref, 3e-2)
    .unwrap();
    let mut ours = AdamW::new(&vs, 3e-2, (0.9, 0.99), 1e-8, 0.05);
    for step in 0..20 {
        let lr = 3e-2 * (1.0 - step as f64 / 40.0);
        reference.set_lr(lr);
        ours.lr = lr;
        reference.zero_grad();
        lin_ref
            .forward(&x)
            .mse_loss(&y, tch::Reduction::Mean)
            .backward();
        reference.step();
        for mut v in vs.trainable_variables() {
            v.zero_grad();
        }
        lin.forward(&x)
            .mse_loss(&y, tch::Reduction::Mean)
            .backward();
        ours.step(&vs).unwrap();
    }
    let (a, b) = (vs_ref.variables(), vs.variables());
    for (name, t) in &a {
        let diff = (t - &b[name]).abs().max().double_value(&[]);
        let scale = t.abs().max().double_value(&[]);
        assert!(
            diff <= 1e-6 * scale,
            "{name}: max difference {diff}, scale {scale}"
        );
    }
    assert_eq!(ours.steps(), 20);
}

fn resume_is_exact(optimizer: OptimizerKind) {
    resume_is_exact_with(optimizer, |_| {});
}

fn resume_is_exact_with(optimizer: OptimizerKind, tweak: impl Fn(&mut TrainConfig)) {
    let _g = torch_lock();
    let full = tempfile::tempdir().unwrap();
    let split = tempfile::tempdir().unwrap();
    let mut cfg = tiny(optimizer, full.path());
    tweak(&mut cfg);
    let a = shampoo_train::train::run(&cfg, single()).unwrap();

    // Stop mid-epoch (step 5 of 8), then continue.
    let mut first = tiny(optimizer, split.path());
    tweak(&mut first);
    first.max_steps = Some(5);
    first.checkpoint_every = Some(5);
    let part = shampoo_train::train::run(&first, single()).unwrap();
    assert_eq!(part.steps, 5);
    // The interrupted session went on past its checkpoint before it stopped:
    // those lines must not survive the resume.
    let stale = r#"{"kind":"step","step":6,"loss":9.0}"#;
    let path = split.path().join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(stale);
    text.push('\n');
    std::fs::write(&path, text).unwrap();
    let mut rest = tiny(optimizer, split.path());
    tweak(&mut rest);
    rest.resume = true;
    let b = shampoo_train::train::run(&rest, single()).unwrap();

    assert_eq!(b.steps, 16);
    assert_same_weights(
        &full.path().join("checkpoint/model.ot"),
        &split.path().join("checkpoint/model.ot"),
    );
    assert_eq!(a.test_acc, b.test_acc);
    assert_eq!(a.test_loss, b.test_loss);
    // The per-step losses after the restart are those of the uninterrupted run.
    let la: Vec<_> = read_records(&full.path().join("metrics.jsonl")).unwrap();
    let lb: Vec<_> = read_records(&split.path().join("metrics.jsonl")).unwrap();
    let steps = |v: &[shampoo_train::metrics::Record]| -> Vec<(u64, Option<f64>)> {
        v.iter()
            .filter(|r| r.kind == "step")
            .map(|r| (r.step, r.loss))
            .collect()
    };
    assert_eq!(steps(&la), steps(&lb));
    let epochs = |v: &[shampoo_train::metrics::Record]| -> Vec<(u64, Option<f64>)> {
        v.iter()
            .filter(|r| r.kind == "epoch")
            .map(|r| (r.step, r.test_acc))
            .collect()
    };
    assert_eq!(epochs(&la), epochs(&lb));
}

#[test]
fn resume_is_exact_adamw() {
    resume_is_exact(OptimizerKind::Adamw);
}

#[test]
fn resume_is_exact_sgd() {
    resume_is_exact(OptimizerKind::Sgd);
}

#[test]
fn resume_is_exact_shampoo_with_preconditioning_before_and_after_the_restart() {
    // Root inverses every 2 steps from step 2: steps 2 and 4 precondition
    // before the checkpoint at 5, 6, 8, ... after it; blocks of at most 128
    // keep the root inverses cheap.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("shampoo.json");
    let text = PROTOCOL_SHAMPOO
        .replace(
            "\"precondition_frequency\": 20",
            "\"precondition_frequency\": 2",
        )
        .replace(
            "\"start_preconditioning_step\": 20",
            "\"start_preconditioning_step\": 2",
        );
    assert_ne!(text, PROTOCOL_SHAMPOO);
    std::fs::write(&conf, text).unwrap();
    resume_is_exact_with(OptimizerKind::Shampoo, |c| {
        c.shampoo_config = Some(conf.clone())
    });
}

#[test]
fn shampoo_trains_channels_last_weights_and_resumes_exactly() {
    // `--channels-last` with Shampoo: the CNN's 4-d weights are read and
    // written in place through their strides; resume rebuilds the engines
    // for the loaded variables' layout.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("shampoo.json");
    let text = PROTOCOL_SHAMPOO
        .replace(
            "\"precondition_frequency\": 20",
            "\"precondition_frequency\": 2",
        )
        .replace(
            "\"start_preconditioning_step\": 20",
            "\"start_preconditioning_step\": 2",
        );
    std::fs::write(&conf, text).unwrap();
    resume_is_exact_with(OptimizerKind::Shampoo, |c| {
        c.shampoo_config = Some(conf.clone());
        c.channels_last = true;
    });
}

#[test]
fn protocol_shampoo_config_has_the_issue_hyperparameters() {
    let parsed = ShampooConfig::from_json(PROTOCOL_SHAMPOO).unwrap();
    let expected = ShampooConfig {
        lr: 1e-3,
        betas: [0.9, 0.999],
        epsilon: 1e-10,
        weight_decay: 1e-4,
        weight_decay_type: WeightDecayType::Decoupled,
        max_preconditioner_dim: 1024,
        precondition_frequency: 20,
        start_preconditioning_step: StartStep::At(20),
        grafting: Some(Grafting::Adam {
            beta2: 0.999,
            epsilon: 1e-8,
            drop_weighting_factor_on_gsquare: false,
        }),
        ..ShampooConfig::default()
    };
    assert_eq!(parsed, expected);
}

#[test]
fn plot_compares_runs_and_writes_a_png() {
    let _g = torch_lock();
    let adamw = tempfile::tempdir().unwrap();
    let sgd = tempfile::tempdir().unwrap();
    let mut a = tiny(OptimizerKind::Adamw, adamw.path());
    a.epochs = 1;
    a.eval_every = Some(2);
    let mut b = tiny(OptimizerKind::Sgd, sgd.path());
    b.epochs = 1;
    b.eval_every = Some(2);
    b.lr = Some(0.05);
    let sa = shampoo_train::train::run(&a, single()).unwrap();
    let sb = shampoo_train::train::run(&b, single()).unwrap();
    let runs = [
        Run::read(sgd.path()).unwrap(),
        Run::read(adamw.path()).unwrap(),
    ];
    assert_eq!(runs[0].evals().len(), 4);
    assert_eq!(runs[1].summary, sa);
    let text = compare(&runs);
    let label = |r: &Run| r.label.clone();
    assert!(
        text.contains(&format!(
            "{:<36} {:>8.2}%",
            label(&runs[0]),
            100.0 * sb.test_acc
        )),
        "{text}"
    );
    // AdamW is the baseline: the line for SGD says when (or whether) it
    // reached AdamW's final accuracy, then the time ratio.
    let passes = match runs[0].first_step_reaching(sa.test_acc) {
        Some(s) => format!("at step {s} of 8"),
        None => "never reaches".to_string(),
    };
    assert!(text.contains(&passes), "{text}");
    assert!(
        text.contains(&format!("{:.2}x", sb.train_s / sa.train_s)),
        "{text}"
    );
    let png = adamw.path().join("plot.png");
    plot(&runs, &png).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn schedule_free_evaluates_on_the_averaged_parameters_and_resumes_exactly() {
    // Evaluations every 2 steps switch to the evaluation view and back
    // (before and after the restart at step 5); a step left in eval mode
    // would be an error.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("shampoo.json");
    let text = PROTOCOL_SHAMPOO
        .replacen(
            '{',
            r#"{"iterate_averaging": {"type": "schedule_free", "train_interp_coeff": 0.9}, "#,
            1,
        )
        .replace(
            "\"precondition_frequency\": 20",
            "\"precondition_frequency\": 2",
        )
        .replace(
            "\"start_preconditioning_step\": 20",
            "\"start_preconditioning_step\": 2",
        );
    ShampooConfig::from_json(&text).unwrap();
    std::fs::write(&conf, text).unwrap();
    resume_is_exact_with(OptimizerKind::Shampoo, |c| {
        c.shampoo_config = Some(conf.clone());
        c.eval_every = Some(2);
    });
}
