//! The sans-IO protocol cores: messages and ticks in, actions out. Nothing in here touches a
//! clock, a socket, a disk or a global random number generator.

pub mod raft;
