//! Development and test fakes that speak the real protocols over real
//! sockets. The fake Conman is embedded so that `eval-proxy --dev` works on
//! a fresh machine with nothing else running.

pub mod conman;
pub mod controlplane;
