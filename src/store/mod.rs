//! The two external stores, each behind a small trait.
//!
//! Nothing outside this module names `s3::` or `redis::`, so the coordinator
//! and the workers can be reasoned about (and unit-tested) without either
//! server, and a failure mode of one client library stays in one file.

mod connection;
pub mod credentials;
mod https;
pub mod ports;
pub mod record;
pub mod redis;
pub mod s3;

pub use self::ports::{
    AssemblyProgress, BucketAdmin, BucketError, CheckpointStore, Integrity, ObjectInfo,
    ObjectStore, OpenUpload, StoredStatus, StoredStream,
};
pub use self::redis::RedisStore;
pub use self::s3::S3Store;
