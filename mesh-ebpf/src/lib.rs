//! Packet logic of fleetmesh's datapath, in plain functions that unit-test on the host.
#![cfg_attr(target_arch = "bpf", no_std)]
