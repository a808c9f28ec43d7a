//! The control shard: placement (static map or Controlplane client with
//! cache, one request per repl, circuit breaker) and admission control,
//! serving every data shard over a socketpair.

pub mod interim;
pub mod wire;
