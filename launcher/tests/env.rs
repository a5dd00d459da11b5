//! The environment ranks see: torchrun's variables for single-node,
//! multi-node and Slurm launches, thread counts and GPU binding.

mod common;

use common::{env_by_rank, launcher, run};

/// A rank program printing the variables under test as `KEY=VALUE` lines.
const PRINT_ENV: &str = r#"env | grep -E '^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_RANK|GROUP_WORLD_SIZE|ROLE_RANK|ROLE_WORLD_SIZE|ROLE_NAME|MASTER_ADDR|MASTER_PORT|TORCHELASTIC_[A-Z_]*|OMP_NUM_THREADS|RAYON_NUM_THREADS|SHAMPOO_RUN[A-Z_]*|CUDA_VISIBLE_DEVICES|PYTHONUNBUFFERED|TORCH_NCCL_ASYNC_ERROR_HANDLING)='"#;

#[test]
fn three_local_ranks_get_torchrun_variables() {
    let out = run(launcher(["--nproc-per-node", "3", "sh", "-c", PRINT_ENV]));
    assert_eq!(out.code(), 0, "{out:#?}");
    let envs = env_by_rank(&out.stdout);
    assert_eq!(envs.len(), 3, "{}", out.stdout);
    let port = &envs[&0]["MASTER_PORT"];
    let port_n: u16 = port.parse().expect("numeric MASTER_PORT");
    assert_ne!(port_n, 0);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = (cores / 3).max(1).to_string();
    for rank in 0..3u32 {
        let env = &envs[&rank];
        let r = rank.to_string();
        let expect = [
            ("RANK", r.as_str()),
            ("LOCAL_RANK", &r),
            ("WORLD_SIZE", "3"),
            ("LOCAL_WORLD_SIZE", "3"),
            ("GROUP_RANK", "0"),
            ("GROUP_WORLD_SIZE", "1"),
            ("ROLE_RANK", &r),
            ("ROLE_WORLD_SIZE", "3"),
            ("ROLE_NAME", "default"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", port),
            ("TORCHELASTIC_RESTART_COUNT", "0"),
            ("TORCHELASTIC_MAX_RESTARTS", "0"),
            ("TORCHELASTIC_USE_AGENT_STORE", "False"),
            ("OMP_NUM_THREADS", &threads),
            ("RAYON_NUM_THREADS", &threads),
            ("SHAMPOO_RUN", "1"),
            ("SHAMPOO_RUN_CUDA_DEVICE", &r),
            ("PYTHONUNBUFFERED", "1"),
            ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        ];
        for (key, value) in expect {
            assert_eq!(
                env.get(key).map(String::as_str),
                Some(value),
                "rank {rank} {key}"
            );
        }
        assert!(
            !env.contains_key("CUDA_VISIBLE_DEVICES"),
            "not set without --bind-gpus"
        );
        assert_eq!(
            env["TORCHELASTIC_RUN_ID"], envs[&0]["TORCHELASTIC_RUN_ID"],
            "one run id for all ranks"
        );
    }
}

#[test]
fn second_node_of_two_gets_ranks_3_to_5_of_6() {
    let out = run(launcher([
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "10.1.2.3",
        "--master-port",
        "29999",
        "--nproc-per-node",
        "3",
        "--run-id",
        "exp42",
        "sh",
        "-c",
        PRINT_ENV,
    ]));
    assert_eq!(out.code(), 0, "{out:#?}");
    let envs = env_by_rank(&out.stdout);
    assert_eq!(envs.keys().copied().collect::<Vec<_>>(), [3, 4, 5]);
    for (rank, env) in &envs {
        assert_eq!(env["RANK"], rank.to_string());
        assert_eq!(env["LOCAL_RANK"], (rank - 3).to_string());
        assert_eq!(env["WORLD_SIZE"], "6");
        assert_eq!(env["LOCAL_WORLD_SIZE"], "3");
        assert_eq!(env["GROUP_RANK"], "1");
        assert_eq!(env["GROUP_WORLD_SIZE"], "2");
        assert_eq!(env["MASTER_ADDR"], "10.1.2.3");
        assert_eq!(env["MASTER_PORT"], "29999");
        assert_eq!(env["TORCHELASTIC_RUN_ID"], "exp42");
    }
}

/// What srun sets for the task on the second of two nodes.
const FAKE_SRUN_NODE_1: &[(&str, &str)] = &[
    ("SLURM_JOB_ID", "4242"),
    ("SLURM_STEP_ID", "0"),
    ("SLURM_NNODES", "2"),
    ("SLURM_STEP_NUM_NODES", "2"),
    ("SLURM_STEP_NUM_TASKS", "2"),
    ("SLURM_NTASKS_PER_NODE", "1"),
    ("SLURM_NODEID", "1"),
    ("SLURM_PROCID", "1"),
    ("SLURM_JOB_NODELIST", "node[07-08]"),
    ("SLURM_STEP_NODELIST", "node[07-08]"),
    ("SLURM_LAUNCH_NODE_IPADDR", "10.9.9.9"),
    ("SLURM_GPUS_ON_NODE", "2"),
];

#[test]
fn slurm_step_variables_define_the_job() {
    let mut cmd = launcher(["sh", "-c", PRINT_ENV]);
    cmd.envs(FAKE_SRUN_NODE_1.iter().copied());
    let out = run(cmd);
    assert_eq!(out.code(), 0, "{out:#?}");
    let envs = env_by_rank(&out.stdout);
    assert_eq!(envs.keys().copied().collect::<Vec<_>>(), [2, 3]);
    for env in envs.values() {
        assert_eq!(env["WORLD_SIZE"], "4");
        assert_eq!(env["LOCAL_WORLD_SIZE"], "2");
        assert_eq!(env["GROUP_RANK"], "1");
        assert_eq!(env["MASTER_ADDR"], "node07", "first host of the node list");
        assert_eq!(env["MASTER_PORT"], "24242", "20000 + job id % 10000");
        assert_eq!(env["TORCHELASTIC_RUN_ID"], "4242");
    }
}

#[test]
fn explicit_flags_override_slurm() {
    let mut cmd = launcher([
        "--nproc-per-node",
        "1",
        "--master-addr",
        "head",
        "--master-port",
        "2345",
        "sh",
        "-c",
        PRINT_ENV,
    ]);
    cmd.envs(FAKE_SRUN_NODE_1.iter().copied());
    let out = run(cmd);
    assert_eq!(out.code(), 0, "{out:#?}");
    let envs = env_by_rank(&out.stdout);
    assert_eq!(envs.keys().copied().collect::<Vec<_>>(), [1]);
    let env = &envs[&1];
    assert_eq!(env["WORLD_SIZE"], "2");
    assert_eq!(env["MASTER_ADDR"], "head");
    assert_eq!(env["MASTER_PORT"], "2345");

    // --no-slurm ignores all of it.
    let mut cmd = launcher(["--no-slurm", "sh", "-c", PRINT_ENV]);
    cmd.envs(FAKE_SRUN_NODE_1.iter().copied());
    let out = run(cmd);
    assert_eq!(out.code(), 0, "{out:#?}");
    let envs = env_by_rank(&out.stdout);
    assert_eq!(envs[&0]["WORLD_SIZE"], "1");
    assert_eq!(envs[&0]["MASTER_ADDR"], "127.0.0.1");
}

#[test]
fn several_srun_tasks_per_node_is_a_usage_error() {
    let mut cmd = launcher(["true"]);
    cmd.envs(FAKE_SRUN_NODE_1.iter().copied())
        .env("SLURM_STEP_NUM_TASKS", "16");
    let out = run(cmd);
    assert_eq!(out.code(), 2, "{out:#?}");
    assert!(out.stderr.contains("--ntasks-per-node=1"), "{}", out.stderr);
}

#[test]
fn user_thread_counts_are_kept_and_variables_are_overridden() {
    let mut cmd = launcher(["--nproc-per-node", "2", "sh", "-c", PRINT_ENV]);
    cmd.env("OMP_NUM_THREADS", "7")
        .env("RANK", "99")
        .env("TORCHELASTIC_ERROR_FILE", "/tmp/parent-error.json");
    let out = run(cmd);
    assert_eq!(out.code(), 0, "{out:#?}");
    let envs = env_by_rank(&out.stdout);
    assert_eq!(envs[&0]["OMP_NUM_THREADS"], "7");
    assert_eq!(envs[&1]["RANK"], "1", "inherited RANK is replaced");
    assert!(!envs[&0].contains_key("TORCHELASTIC_ERROR_FILE"));
}

#[test]
fn bind_gpus_gives_each_rank_one_visible_device() {
    // CUDA_VISIBLE_DEVICES decides what is visible, so no GPU is needed.
    let mut cmd = launcher([
        "--bind-gpus",
        "--nproc-per-node",
        "2",
        "sh",
        "-c",
        PRINT_ENV,
    ]);
    cmd.env("CUDA_VISIBLE_DEVICES", "3,5,6");
    let out = run(cmd);
    assert_eq!(out.code(), 0, "{out:#?}");
    let envs = env_by_rank(&out.stdout);
    assert_eq!(envs[&0]["CUDA_VISIBLE_DEVICES"], "3");
    assert_eq!(envs[&1]["CUDA_VISIBLE_DEVICES"], "5");
    assert_eq!(envs[&1]["SHAMPOO_RUN_CUDA_DEVICE"], "0");
    assert_eq!(envs[&1]["LOCAL_RANK"], "1");

    // Without --bind-gpus the inherited value is passed through untouched.
    let mut cmd = launcher(["--nproc-per-node", "2", "sh", "-c", PRINT_ENV]);
    cmd.env("CUDA_VISIBLE_DEVICES", "3,5,6");
    let out = run(cmd);
    let envs = env_by_rank(&out.stdout);
    assert_eq!(envs[&1]["CUDA_VISIBLE_DEVICES"], "3,5,6");
    assert_eq!(envs[&1]["SHAMPOO_RUN_CUDA_DEVICE"], "1");
}

#[test]
fn gpu_ranks_follow_cuda_visible_devices() {
    let mut cmd = launcher(["--nproc-per-node", "gpu", "sh", "-c", PRINT_ENV]);
    cmd.env("CUDA_VISIBLE_DEVICES", "0,1");
    let out = run(cmd);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert_eq!(env_by_rank(&out.stdout).len(), 2);

    let mut cmd = launcher(["--nproc-per-node", "gpu", "true"]);
    cmd.env("CUDA_VISIBLE_DEVICES", "");
    let out = run(cmd);
    assert_eq!(out.code(), 2, "{out:#?}");
    assert!(out.stderr.contains("none are visible"), "{}", out.stderr);

    let mut cmd = launcher(["--nproc-per-node", "auto", "sh", "-c", PRINT_ENV]);
    cmd.env("CUDA_VISIBLE_DEVICES", "");
    let out = run(cmd);
    assert_eq!(out.code(), 0, "{out:#?}");
    assert_eq!(
        env_by_rank(&out.stdout).len(),
        1,
        "auto without GPUs: one rank"
    );
}
