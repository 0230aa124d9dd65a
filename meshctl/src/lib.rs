//! meshctl's library side: what the command line does, usable from tests and tools.

pub mod clustermesh;
pub mod hub;
pub mod kubemesh;
pub mod kubestatus;
