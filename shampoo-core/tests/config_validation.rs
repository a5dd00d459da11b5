//! Every validation rule gives its own clear message.

use shampoo_core::ShampooConfig;

fn err(json: &str) -> String {
    match ShampooConfig::from_json(json) {
        Ok(_) => panic!("{json} should be rejected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn each_invalid_value_is_named() {
    let cases: &[(&str, &str)] = &[
        (r#"{"lr": -0.1}"#, "lr must be >= 0, got -0.1"),
        (
            r#"{"betas": [1.0, 0.9]}"#,
            "betas[0] must be in [0, 1), got 1.0",
        ),
        (
            r#"{"betas": [-0.1, 0.9]}"#,
            "betas[0] must be in [0, 1), got -0.1",
        ),
        (
            r#"{"betas": [0.9, 1.5]}"#,
            "betas[1] must be in [0, 1], got 1.5",
        ),
        (r#"{"epsilon": 0.0}"#, "epsilon must be > 0, got 0.0"),
        (r#"{"epsilon": -1e-12}"#, "epsilon must be > 0, got -1e-12"),
        (
            r#"{"weight_decay": -1.0}"#,
            "weight_decay must be >= 0, got -1.0",
        ),
        (
            r#"{"max_preconditioner_dim": 0}"#,
            "max_preconditioner_dim must be >= 1, got 0",
        ),
        (
            r#"{"precondition_frequency": 0}"#,
            "precondition_frequency must be >= 1, got 0",
        ),
        (
            r#"{"precondition_frequency": 10, "start_preconditioning_step": 5}"#,
            "start_preconditioning_step must be -1 or >= precondition_frequency (10), got 5",
        ),
        (
            r#"{"start_preconditioning_step": -2}"#,
            "start_preconditioning_step must be -1",
        ),
        (r#"{"start_preconditioning_step": "soon"}"#, "got \"soon\""),
        (
            r#"{"grafting": {"type": "adagrad", "epsilon": 0.0}}"#,
            "grafting (adagrad) epsilon must be > 0, got 0.0",
        ),
        (
            r#"{"grafting": {"type": "adam", "beta2": 0.0}}"#,
            "grafting (adam) beta2 must be in (0, 1], got 0.0",
        ),
        (
            r#"{"grafting": {"type": "rmsprop", "beta2": 1.2}}"#,
            "grafting (rmsprop) beta2 must be in (0, 1], got 1.2",
        ),
        (
            r#"{"grafting": {"type": "lion"}}"#,
            "unknown variant `lion`",
        ),
        (
            r#"{"momentum": {"momentum": 1.0}}"#,
            "momentum.momentum must be in [0, 1), got 1.0",
        ),
        (
            r#"{"momentum": {"momentum": 0.9, "dampening": 1.0}}"#,
            "momentum.dampening must be in [0, 1), got 1.0",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "coupled_newton", "max_iterations": 0}}}"#,
            "coupled_newton.max_iterations must be >= 1, got 0",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "coupled_newton", "tolerance": -1}}}"#,
            "coupled_newton.tolerance must be finite and >= 0, got -1.0",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton", "iterations": 0}}}"#,
            "batched_newton.iterations must be in 1..=1000, got 0",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton", "iterations": 1001}}}"#,
            "batched_newton.iterations must be in 1..=1000, got 1001",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton", "tolerance": 0}}}"#,
            "batched_newton.tolerance must be finite and > 0 (the largest accepted max |M - I|), got 0.0",
        ),
        (
            r#"{"preconditioner": {"type": "kl_shampoo", "variant": "root_inv", "root_inverse": {"method": "batched_newton", "tolerance": -1e-3}}}"#,
            "batched_newton.tolerance must be finite and > 0 (the largest accepted max |M - I|), got -0.001",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton", "max_iterations": 10}}}"#,
            "unknown field `max_iterations`",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton"}, "inverse_exponent_override": {"2": 0.3}}}"#,
            "inverse_exponent_override [2] = 0.3: batched_newton needs 1/exponent to be an integer",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "inverse_exponent_override": {"0": 0.5}}}"#,
            "inverse_exponent_override key \"0\" must be a block order",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "inverse_exponent_override": {"2": {"2": 0.5}}}}"#,
            "key \"2\" must be a dimension index below the order 2",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "inverse_exponent_override": {"1": -0.5}}}"#,
            "inverse_exponent_override [1] must be finite and >= 0, got -0.5",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "coupled_newton"}, "inverse_exponent_override": {"2": 0.3}}}"#,
            "coupled_newton needs 1/exponent to be an integer",
        ),
        (
            r#"{"preconditioner": {"type": "kfac"}}"#,
            "unknown variant `kfac`",
        ),
        (
            r#"{"lr": 0.1, "momentun": 0.9}"#,
            "unknown field `momentun`",
        ),
        (r#"{"weight_decay_type": "l1"}"#, "unknown variant `l1`"),
        (r#"{"factor_dtype": "f16"}"#, "unknown variant `f16`"),
        (r#"{"lr": "fast"}"#, "invalid type"),
    ];
    for (json, want) in cases {
        let e = err(json);
        assert!(
            e.contains(want),
            "{json}: got {e:?}, want it to contain {want:?}"
        );
    }
}

#[test]
fn the_reference_schema_parses_and_round_trips() {
    for entry in std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/reference"
    ))
    .unwrap()
    {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let cfg = ShampooConfig::from_json(&v["config"].to_string()).unwrap();
            let again = ShampooConfig::from_json(&cfg.to_json()).unwrap();
            assert_eq!(cfg, again, "{path:?}");
        }
    }
}

#[test]
fn defaults_are_the_published_ones() {
    let c = ShampooConfig::from_json("{}").unwrap();
    assert_eq!(c, ShampooConfig::default());
    assert_eq!((c.lr, c.betas, c.epsilon), (0.01, [0.9, 1.0], 1e-12));
    assert_eq!(
        (c.max_preconditioner_dim, c.precondition_frequency),
        (1024, 1)
    );
    assert_eq!(c.start_step(), Some(1));
    let c = ShampooConfig::from_json(r#"{"start_preconditioning_step": "never"}"#).unwrap();
    assert_eq!(c.start_step(), None);
    let c = ShampooConfig::from_json(r#"{"grafting": {"type": "adam"}}"#).unwrap();
    assert_eq!(
        c.grafting,
        Some(shampoo_core::config::Grafting::Adam {
            beta2: 0.999,
            epsilon: 1e-8,
            drop_weighting_factor_on_gsquare: false,
        })
    );
}

/// The restrictions the reference README lists, each a clear error.
#[test]
fn every_restriction_of_the_published_implementation_is_an_error() {
    let cases: &[(&str, &str)] = &[
        // pseudo_inverse needs epsilon 0 ...
        (
            r#"{"epsilon": 1e-12, "preconditioner": {"type": "root_inv", "root_inverse": {"method": "eigh",
                "rank_deficient_stability": {"type": "pseudo_inverse"}}}}"#,
            "a pseudo_inverse rank_deficient_stability needs epsilon = 0, got 1e-12",
        ),
        (
            r#"{"epsilon": 1e-6, "preconditioner": {"type": "eigendecomposed", "eigendecomposition": {"method": "qr",
                "rank_deficient_stability": {"type": "pseudo_inverse", "rank_rtol": null}}}}"#,
            "a pseudo_inverse rank_deficient_stability needs epsilon = 0, got 1e-6",
        ),
        // ... and is not accepted by eigenvalue_corrected,
        (
            r#"{"epsilon": 0.0, "preconditioner": {"type": "eigenvalue_corrected", "eigendecomposition": {"method": "eigh",
                "rank_deficient_stability": {"type": "pseudo_inverse"}}}}"#,
            "eigenvalue_corrected does not accept a pseudo_inverse rank_deficient_stability (only perturbation)",
        ),
        // every other config needs epsilon > 0,
        (
            r#"{"epsilon": 0.0, "preconditioner": {"type": "sign_descent"}}"#,
            "epsilon must be > 0, got 0.0 (0 only with a pseudo_inverse rank_deficient_stability)",
        ),
        (
            r#"{"epsilon": 0.0, "preconditioner": {"type": "eigendecomposed"}}"#,
            "epsilon must be > 0, got 0.0",
        ),
        // coupled_newton needs integer roots (KL-Shampoo's too),
        (
            r#"{"preconditioner": {"type": "kl_shampoo", "variant": "root_inv",
                "root_inverse": {"method": "coupled_newton"}, "inverse_exponent_override": {"1": 0.4}}}"#,
            "inverse_exponent_override [1] = 0.4: coupled_newton needs 1/exponent to be an integer",
        ),
        // corrected and independent weight decay need lr > 0,
        (
            r#"{"lr": 0.0, "weight_decay": 0.1, "weight_decay_type": "corrected"}"#,
            "weight_decay_type Corrected divides by the peak learning rate: lr must be > 0, got 0.0",
        ),
        (
            r#"{"lr": 0.0, "weight_decay_type": "independent"}"#,
            "weight_decay_type Independent divides by the peak learning rate: lr must be > 0, got 0.0",
        ),
        // momentum and iterate_averaging are exclusive.
        (
            r#"{"momentum": {"momentum": 0.9}, "iterate_averaging": {"type": "gpa"}}"#,
            "momentum and iterate_averaging are exclusive",
        ),
        (
            r#"{"momentum": {"momentum": 0.9}, "iterate_averaging": {"type": "schedule_free"}}"#,
            "momentum and iterate_averaging are exclusive",
        ),
    ];
    for (json, want) in cases {
        let e = err(json);
        assert!(
            e.contains(want),
            "{json}: got {e:?}, want it to contain {want:?}"
        );
    }
}

/// Spectral descent's restriction needs the shapes: every block 2-D.
#[test]
fn spectral_descent_rejects_blocks_that_are_not_two_dimensional() {
    use shampoo_core::{CpuBackend, DType, Shampoo};
    let cfg = ShampooConfig::from_json(
        r#"{"max_preconditioner_dim": 8, "preconditioner": {"type": "spectral_descent"}}"#,
    )
    .unwrap();
    let build = |shapes: &[Vec<usize>]| {
        Shampoo::new(cfg.clone(), shapes, DType::F64, CpuBackend::new(1).unwrap()).map(|_| ())
    };
    // (2, 3, 4) merges to (6, 4); (3, 5) stays; both 2-D.
    build(&[vec![2, 3, 4], vec![3, 5]]).unwrap();
    let e = build(&[vec![6, 5], vec![7]]).unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid config: spectral_descent needs every block to be 2-D after merging, but parameter 1 of shape [7] gives 1-D blocks ([7]): use another preconditioner for it (a separate optimizer)"
    );
    // (9, 10, 11) with max 8 cannot merge: 3-D.
    let e = build(&[vec![9, 10, 11]]).unwrap_err().to_string();
    assert!(
        e.contains("parameter 0 of shape [9, 10, 11] gives 3-D blocks"),
        "{e}"
    );
}

/// The other values of the new keys the published implementation checks.
#[test]
fn new_keys_are_validated() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"beta3": 1.0}"#,
            "beta3 must be -1 (= betas[0]) or in [0, 1), got 1.0",
        ),
        (
            r#"{"lr_schedule": [0.1, -0.1]}"#,
            "lr_schedule[1] must be finite and >= 0, got -0.1",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "use_trace_scaling": true, "trace_scaling_exponent": 1.5}}"#,
            "trace_scaling_exponent must be in (0, 1] with use_trace_scaling, got 1.5",
        ),
        (
            r#"{"preconditioner": {"type": "eigendecomposed", "eigendecomposition": {"method": "eigh", "tolerance": 1.5}}}"#,
            "eigendecomposition.tolerance must be in [0, 1], got 1.5",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "eigh", "tolerance": 0.1}}}"#,
            "root_inverse eigh has no adaptive tolerance (got 0.1)",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "coupled_higher_order", "rel_epsilon": 1e-3}}}"#,
            "missing field `abs_epsilon`",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "coupled_higher_order", "rel_epsilon": 1e-3, "abs_epsilon": 0.0, "order": 1}}}"#,
            "coupled_higher_order.order must be >= 2 (2 is Newton's method), got 1",
        ),
        (
            r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "coupled_higher_order", "rel_epsilon": 1e-3, "abs_epsilon": 0.0},
                "inverse_exponent_override": {"2": 0.3}}}"#,
            "coupled_higher_order needs 1/exponent to be a short binary fraction p/q",
        ),
        (
            r#"{"preconditioner": {"type": "eigenvalue_corrected", "ignored_basis_change_dims": {"2": [2]}}}"#,
            "ignored_basis_change_dims[2] has dimension 2; blocks of order 2 have dimensions 0..=1",
        ),
        (
            r#"{"preconditioner": {"type": "eigenvalue_corrected", "ignored_basis_change_dims": {"3": [1, 1]}}}"#,
            "ignored_basis_change_dims[3] lists dimension 1 twice",
        ),
        (
            r#"{"preconditioner": {"type": "eigenvalue_corrected", "inverse_exponent_override": {"2": 0.0}}}"#,
            "inverse_exponent_override[2] of eigenvalue_corrected must be finite and > 0, got 0.0",
        ),
        (
            r#"{"preconditioner": {"type": "kl_shampoo", "variant": "root_inv", "eigendecomposition": {"method": "eigh"}}}"#,
            "kl_shampoo variant \"root_inv\" takes root_inverse, not eigendecomposition",
        ),
        (
            r#"{"preconditioner": {"type": "kl_shampoo", "variant": "eigendecomposed", "root_inverse": {"method": "eigh"}}}"#,
            "kl_shampoo variant \"eigendecomposed\" takes eigendecomposition, not root_inverse",
        ),
        (
            r#"{"preconditioner": {"type": "kl_shampoo"}}"#,
            "missing field `variant`",
        ),
        (
            r#"{"iterate_averaging": {"type": "gpa", "eval_interp_coeff": 1.0}}"#,
            "iterate_averaging.eval_interp_coeff must be in [0, 1), got 1.0",
        ),
        (
            r#"{"iterate_averaging": {"type": "schedule_free", "train_interp_coeff": 0.0}}"#,
            "iterate_averaging.train_interp_coeff must be in (0, 1], got 0.0",
        ),
        (
            r#"{"preconditioner": {"type": "spectral_descent", "orthogonalization": {"method": "qr"}}}"#,
            "unknown variant `qr`",
        ),
    ];
    for (json, want) in cases {
        let e = err(json);
        assert!(
            e.contains(want),
            "{json}: got {e:?}, want it to contain {want:?}"
        );
    }
}

#[test]
fn new_keys_default_to_the_published_values() {
    use shampoo_core::config::*;
    let c = ShampooConfig::from_json("{}").unwrap();
    assert_eq!((c.beta3, c.beta3()), (-1.0, 0.9));
    assert_eq!((c.lr_schedule.clone(), c.iterate_averaging), (None, None));
    let c = ShampooConfig::from_json(
        r#"{"preconditioner": {"type": "eigenvalue_corrected", "eigendecomposition": {"method": "qr"}}}"#,
    )
    .unwrap();
    match c.preconditioner {
        Preconditioner::EigenvalueCorrected {
            eigendecomposition:
                Eigendecomposition::Qr {
                    max_iterations: 1,
                    tolerance: 0.0,
                    rank_deficient_stability:
                        RankDeficientStability::Perturbation {
                            perturb_before_computation: true,
                        },
                },
            use_trace_scaling: false,
            trace_scaling_exponent: 0.5,
            drop_weighting_factor_on_gsquare: false,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    let c = ShampooConfig::from_json(
        r#"{"preconditioner": {"type": "root_inv", "root_inverse": {"method": "coupled_higher_order", "rel_epsilon": 1e-3, "abs_epsilon": 1e-9}}}"#,
    )
    .unwrap();
    assert_eq!(
        c.amortized(),
        Amortized::RootInverse(RootInverse::CoupledHigherOrder {
            rel_epsilon: 1e-3,
            abs_epsilon: 1e-9,
            max_iterations: 100,
            tolerance: 1e-8,
            order: 3,
        })
    );
    let c = ShampooConfig::from_json(
        r#"{"epsilon": 0.0, "preconditioner": {"type": "eigendecomposed", "eigendecomposition": {"method": "eigh", "rank_deficient_stability": {"type": "pseudo_inverse"}}}}"#,
    )
    .unwrap();
    assert_eq!(
        c.rank_deficient_stability(),
        RankDeficientStability::PseudoInverse {
            rank_atol: 0.0,
            rank_rtol: Some(0.0)
        }
    );
    let c =
        ShampooConfig::from_json(r#"{"preconditioner": {"type": "spectral_descent"}}"#).unwrap();
    assert_eq!(
        c.preconditioner,
        Preconditioner::SpectralDescent {
            orthogonalization: Orthogonalization::NewtonSchulz {
                num_iterations: 5,
                coefficients: [3.4445, -4.775, 2.0315]
            }
        }
    );
    assert_eq!((c.effective_frequency(), c.start_step()), (1, Some(1)));
    let c = ShampooConfig::from_json(r#"{"iterate_averaging": {"type": "gpa"}}"#).unwrap();
    assert_eq!(
        c.iterate_averaging,
        Some(IterateAveraging::Gpa {
            eval_interp_coeff: 0.9,
            train_interp_coeff: 0.8
        })
    );
    let c =
        ShampooConfig::from_json(r#"{"iterate_averaging": {"type": "schedule_free"}}"#).unwrap();
    assert_eq!(
        c.iterate_averaging,
        Some(IterateAveraging::ScheduleFree {
            train_interp_coeff: 0.8,
            eval_coeff_lr_power: 2.0
        })
    );
}

/// Every JSON example of docs/config.md is a valid configuration.
#[test]
fn the_examples_of_the_configuration_reference_are_valid() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config.md")).unwrap();
    let mut examples = 0;
    let mut rest = text.as_str();
    while let Some(start) = rest.find("```json\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("closed code block");
        if let Err(e) = ShampooConfig::from_json(&body[..end]) {
            panic!(
                "docs/config.md example {}: {e}\n{}",
                examples + 1,
                &body[..end]
            );
        }
        examples += 1;
        rest = &body[end..];
    }
    assert!(examples >= 10, "only {examples} examples found");
}
