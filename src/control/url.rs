//! The control shard's URLs: the shared parser in `proto::url`.

pub use crate::proto::url::*;
