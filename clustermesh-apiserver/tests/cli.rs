//! The apiserver's command line: a cluster id outside 1-4095 or a heartbeat interval below 100ms stops it at
//! start, before it connects to anything, with a message naming the flag and the value.

use std::process::{Command, Output};

/// Runs clustermesh-apiserver with `args` (an etcd nobody listens on) and nothing inherited that configures it.
fn apiserver(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"));
    cmd.args(["--cluster-name", "east", "--etcd-endpoints", "http://127.0.0.1:9"])
        .args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLEETMESH_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("running clustermesh-apiserver")
}

#[test]
fn cluster_ids_beyond_1_to_4095_fail_at_start_naming_the_flag() {
    for id in ["0", "4096"] {
        for (args, env) in [
            (vec!["--cluster-id", id], vec![]),
            (vec![], vec![("FLEETMESH_CLUSTER_ID", id)]),
        ] {
            let out = apiserver(&args, &env);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "a usage error ({args:?} {env:?}): {stderr}"
            );
            assert!(
                stderr.contains("--cluster-id") && stderr.contains(&format!("{id} is not in 1..=4095")),
                "{args:?} {env:?}: {stderr}"
            );
        }
    }
    // The edges themselves parse (clap checks the value before it prints the help that follows it).
    for id in ["1", "4095"] {
        let out = apiserver(&["--cluster-id", id, "--help"], &[]);
        assert!(
            out.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_heartbeat_interval_below_100ms_fails_at_start() {
    for value in ["0", "99ms"] {
        let out = apiserver(&["--cluster-id", "1", "--heartbeat-interval", value], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value}: {stderr}");
        assert!(
            stderr.contains("--heartbeat-interval must be at least 100ms") && !stderr.contains("panicked"),
            "{value}: {stderr}"
        );
    }
    let out = apiserver(&["--cluster-id", "1", "--heartbeat-interval", "soon"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--heartbeat-interval") && stderr.contains("\"soon\""),
        "{stderr}"
    );
}
