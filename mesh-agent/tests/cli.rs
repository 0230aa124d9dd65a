//! The agent's command line: a bad value stops the agent at start, before it touches the node, with a message
//! naming the flag (or its environment variable) and the value.

use std::process::{Command, Output};

/// Runs mesh-agent with the required flags, `args` and `env`, and nothing inherited that configures it.
fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut all = vec!["--cluster-id", "1"];
    all.extend_from_slice(args);
    agent_without_id(&all, env)
}

/// As [`agent`], without `--cluster-id`.
fn agent_without_id(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-agent"));
    cmd.args(["--node-name", "east-node-1", "--cluster-name", "east"])
        .args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLEETMESH_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("running mesh-agent")
}

#[test]
fn a_bad_service_affinity_default_fails_at_start_naming_the_value() {
    for (args, env) in [
        (&["--service-affinity-default", "closest"][..], &[][..]),
        (&[][..], &[("FLEETMESH_SERVICE_AFFINITY_DEFAULT", "closest")][..]),
    ] {
        let out = agent(args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "a usage error ({args:?} {env:?}): {stderr}"
        );
        assert!(
            stderr.contains("--service-affinity-default")
                && stderr.contains("\"closest\" is not local, remote or none"),
            "{args:?} {env:?}: {stderr}"
        );
    }
}

#[test]
fn the_service_affinity_default_is_documented_with_its_environment_variable() {
    let out = agent(&["--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    assert!(
        help.contains("--service-affinity-default")
            && help.contains("FLEETMESH_SERVICE_AFFINITY_DEFAULT")
            && help.contains("[default: none]"),
        "{help}"
    );
}

#[test]
fn cluster_ids_beyond_1_to_4095_fail_at_start_naming_the_flag() {
    for id in ["0", "4096"] {
        for (args, env) in [
            (vec!["--cluster-id", id], vec![]),
            (vec![], vec![("FLEETMESH_CLUSTER_ID", id)]),
        ] {
            let out = agent_without_id(&args, &env);
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
    // The edges themselves parse (`--help` after the id: clap checks the value first, then prints the help).
    for id in ["1", "4095"] {
        let out = agent_without_id(&["--cluster-id", id, "--help"], &[]);
        assert!(
            out.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
