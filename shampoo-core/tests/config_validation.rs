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
            epsilon: 1e-8
        })
    );
}
