//! The environment each rank is started with.
//!
//! Ranks inherit the launcher's environment, plus the variables torchrun sets
//! (so programs written for torchrun run unchanged) and a few of our own.
//! [`VARIABLES`] lists them all with their meaning; `docs/launcher.md` must
//! mention every one (a test checks).

use std::ffi::OsString;

use crate::plan::LaunchPlan;

/// When a variable is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Always set, replacing an inherited value.
    Always,
    /// Set only when the launcher's own environment has no (or an empty) value.
    IfUnset,
    /// Set only with `--bind-gpus`.
    BindGpus,
    /// Set only when its flag is given (`--comm-timeout`).
    WithFlag,
    /// Removed from the inherited environment.
    Removed,
}

/// Every variable shampoo-run sets or removes, with its policy and meaning.
pub const VARIABLES: &[(&str, Policy, &str)] = &[
    ("RANK", Policy::Always, "global rank, 0..WORLD_SIZE-1"),
    (
        "LOCAL_RANK",
        Policy::Always,
        "rank on this node, 0..LOCAL_WORLD_SIZE-1",
    ),
    (
        "WORLD_SIZE",
        Policy::Always,
        "total ranks: nnodes x nproc-per-node",
    ),
    (
        "LOCAL_WORLD_SIZE",
        Policy::Always,
        "ranks on this node (nproc-per-node)",
    ),
    ("GROUP_RANK", Policy::Always, "this node's rank (node-rank)"),
    (
        "GROUP_WORLD_SIZE",
        Policy::Always,
        "number of nodes (nnodes)",
    ),
    (
        "ROLE_NAME",
        Policy::Always,
        "always `default` (single role, as torchrun)",
    ),
    ("ROLE_RANK", Policy::Always, "same as RANK (single role)"),
    (
        "ROLE_WORLD_SIZE",
        Policy::Always,
        "same as WORLD_SIZE (single role)",
    ),
    (
        "MASTER_ADDR",
        Policy::Always,
        "address of node 0, where rank 0 hosts the store",
    ),
    (
        "MASTER_PORT",
        Policy::Always,
        "port of the store on MASTER_ADDR",
    ),
    (
        "TORCHELASTIC_RESTART_COUNT",
        Policy::Always,
        "attempt number: 0, then 1 after the first restart, ...",
    ),
    (
        "TORCHELASTIC_MAX_RESTARTS",
        Policy::Always,
        "the --max-restarts value",
    ),
    ("TORCHELASTIC_RUN_ID", Policy::Always, "the --run-id value"),
    (
        "TORCHELASTIC_USE_AGENT_STORE",
        Policy::Always,
        "`False`: shampoo-run hosts no store, so rank 0 creates it at MASTER_ADDR:MASTER_PORT",
    ),
    (
        "SHAMPOO_RUN",
        Policy::Always,
        "`1`, so programs can tell they run under shampoo-run",
    ),
    (
        "SHAMPOO_RUN_CUDA_DEVICE",
        Policy::Always,
        "CUDA device index this rank should use in its own view: LOCAL_RANK, or 0 with --bind-gpus",
    ),
    (
        "OMP_NUM_THREADS",
        Policy::IfUnset,
        "max(1, available cores / LOCAL_WORLD_SIZE) (torchrun uses 1)",
    ),
    (
        "RAYON_NUM_THREADS",
        Policy::IfUnset,
        "same value as OMP_NUM_THREADS",
    ),
    (
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        Policy::IfUnset,
        "`1`, as torchrun: NCCL errors abort the rank instead of hanging it",
    ),
    (
        "PYTHONUNBUFFERED",
        Policy::IfUnset,
        "`1`: Python output reaches the console and logs as it is printed (torchrun runs `python -u`)",
    ),
    (
        "CUDA_VISIBLE_DEVICES",
        Policy::BindGpus,
        "with --bind-gpus: the LOCAL_RANK-th visible device only; otherwise inherited untouched",
    ),
    (
        "SHAMPOO_COMM_TIMEOUT",
        Policy::WithFlag,
        "with --comm-timeout: the collectives' peer timeout in seconds (read by shampoo-dist); otherwise inherited untouched",
    ),
    (
        "TORCHELASTIC_ERROR_FILE",
        Policy::Removed,
        "removed, so a launcher started inside another launcher does not write to its parent's error file",
    ),
];

/// The changes to apply to the inherited environment for one rank.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankEnv {
    /// Variables to set, in [`VARIABLES`] order.
    pub set: Vec<(&'static str, OsString)>,
    /// Variables to remove.
    pub remove: Vec<&'static str>,
}

impl RankEnv {
    /// The value this rank gets for `name`, if shampoo-run sets it.
    pub fn get(&self, name: &str) -> Option<&OsString> {
        self.set.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }
}

/// Builds the environment changes for `local_rank` in attempt `attempt`
/// (0-based), with MASTER_PORT `master_port`. `inherited` looks up the
/// launcher's own environment, to leave user-set values alone.
pub fn rank_env(
    plan: &LaunchPlan,
    local_rank: u32,
    attempt: u32,
    master_port: u16,
    inherited: &dyn Fn(&str) -> Option<OsString>,
) -> RankEnv {
    let rank = plan.global_rank(local_rank);
    let world = plan.world_size();
    let threads = plan.threads_per_rank.to_string();
    let bound_device = plan
        .gpu_binding
        .as_ref()
        .and_then(|devices| devices.get(usize::try_from(local_rank).ok()?));
    let cuda_device = if bound_device.is_some() {
        "0".to_owned()
    } else {
        local_rank.to_string()
    };

    let mut env = RankEnv::default();
    for &(name, policy, _) in VARIABLES {
        let value: String = match name {
            "RANK" | "ROLE_RANK" => rank.to_string(),
            "LOCAL_RANK" => local_rank.to_string(),
            "WORLD_SIZE" | "ROLE_WORLD_SIZE" => world.to_string(),
            "LOCAL_WORLD_SIZE" => plan.nproc_per_node.to_string(),
            "GROUP_RANK" => plan.node_rank.to_string(),
            "GROUP_WORLD_SIZE" => plan.nnodes.to_string(),
            "ROLE_NAME" => "default".to_owned(),
            "MASTER_ADDR" => plan.master_addr.clone(),
            "MASTER_PORT" => master_port.to_string(),
            "TORCHELASTIC_RESTART_COUNT" => attempt.to_string(),
            "TORCHELASTIC_MAX_RESTARTS" => plan.max_restarts.to_string(),
            "TORCHELASTIC_RUN_ID" => plan.run_id.clone(),
            "TORCHELASTIC_USE_AGENT_STORE" => "False".to_owned(),
            "SHAMPOO_RUN" => "1".to_owned(),
            "SHAMPOO_RUN_CUDA_DEVICE" => cuda_device.clone(),
            "OMP_NUM_THREADS" | "RAYON_NUM_THREADS" => threads.clone(),
            "TORCH_NCCL_ASYNC_ERROR_HANDLING" | "PYTHONUNBUFFERED" => "1".to_owned(),
            "CUDA_VISIBLE_DEVICES" => match bound_device {
                Some(device) => device.clone(),
                None => continue,
            },
            "SHAMPOO_COMM_TIMEOUT" => match plan.comm_timeout {
                Some(t) => t.as_secs_f64().to_string(),
                None => continue,
            },
            _ => String::new(),
        };
        match policy {
            Policy::Always | Policy::BindGpus | Policy::WithFlag => {
                env.set.push((name, value.into()))
            }
            Policy::IfUnset => {
                if inherited(name).is_none_or(|v| v.is_empty()) {
                    env.set.push((name, value.into()));
                }
            }
            Policy::Removed => env.remove.push(name),
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::MasterPort;
    use std::time::Duration;

    fn plan() -> LaunchPlan {
        LaunchPlan {
            program: "train".into(),
            args: vec![],
            nproc_per_node: 3,
            nnodes: 2,
            node_rank: 1,
            master_addr: "10.0.0.1".into(),
            master_port: MasterPort::Fixed(29500),
            max_restarts: 2,
            run_id: "job7".into(),
            log_dir: None,
            console: true,
            grace_period: Duration::from_secs(3),
            gpu_binding: None,
            threads_per_rank: 5,
            tail_lines: 20,
            exit_barrier_timeout: None,
            comm_timeout: None,
            hostname: "h".into(),
            from_slurm: false,
        }
    }

    fn get<'a>(env: &'a RankEnv, name: &str) -> &'a str {
        env.get(name)
            .unwrap_or_else(|| panic!("{name} not set"))
            .to_str()
            .unwrap()
    }

    #[test]
    fn torchrun_variables_for_a_rank_on_the_second_node() {
        let env = rank_env(&plan(), 2, 1, 29500, &|_| None);
        let expect = [
            ("RANK", "5"),
            ("LOCAL_RANK", "2"),
            ("WORLD_SIZE", "6"),
            ("LOCAL_WORLD_SIZE", "3"),
            ("GROUP_RANK", "1"),
            ("GROUP_WORLD_SIZE", "2"),
            ("ROLE_NAME", "default"),
            ("ROLE_RANK", "5"),
            ("ROLE_WORLD_SIZE", "6"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_RESTART_COUNT", "1"),
            ("TORCHELASTIC_MAX_RESTARTS", "2"),
            ("TORCHELASTIC_RUN_ID", "job7"),
            ("TORCHELASTIC_USE_AGENT_STORE", "False"),
            ("SHAMPOO_RUN", "1"),
            ("SHAMPOO_RUN_CUDA_DEVICE", "2"),
            ("OMP_NUM_THREADS", "5"),
            ("RAYON_NUM_THREADS", "5"),
            ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
            ("PYTHONUNBUFFERED", "1"),
        ];
        for (name, value) in expect {
            assert_eq!(get(&env, name), value, "{name}");
        }
        assert_eq!(env.get("CUDA_VISIBLE_DEVICES"), None, "inherited untouched");
        assert_eq!(env.remove, ["TORCHELASTIC_ERROR_FILE"]);
    }

    #[test]
    fn user_thread_settings_are_respected() {
        let inherited = |name: &str| match name {
            "OMP_NUM_THREADS" => Some(OsString::from("7")),
            "RAYON_NUM_THREADS" => Some(OsString::new()), // empty counts as unset
            _ => None,
        };
        let env = rank_env(&plan(), 0, 0, 1, &inherited);
        assert_eq!(env.get("OMP_NUM_THREADS"), None);
        assert_eq!(get(&env, "RAYON_NUM_THREADS"), "5");
    }

    #[test]
    fn bind_gpus_gives_each_rank_one_device_seen_as_zero() {
        let mut p = plan();
        p.gpu_binding = Some(vec!["4".into(), "GPU-abc".into(), "6".into()]);
        let env = rank_env(&p, 1, 0, 1, &|_| None);
        assert_eq!(get(&env, "CUDA_VISIBLE_DEVICES"), "GPU-abc");
        assert_eq!(get(&env, "SHAMPOO_RUN_CUDA_DEVICE"), "0");
        assert_eq!(get(&env, "LOCAL_RANK"), "1", "LOCAL_RANK is not rewritten");
    }

    #[test]
    fn every_variable_has_a_value() {
        let mut p = plan();
        p.gpu_binding = Some(vec!["0".into(), "1".into(), "2".into()]);
        p.comm_timeout = Some(Duration::from_millis(2500));
        let env = rank_env(&p, 0, 0, 1, &|_| None);
        for (name, value) in &env.set {
            assert!(!value.is_empty(), "{name} is empty");
        }
        assert_eq!(env.set.len() + env.remove.len(), VARIABLES.len());
    }
}
