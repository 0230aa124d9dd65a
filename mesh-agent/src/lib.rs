pub mod datapath;
pub mod netdev;
