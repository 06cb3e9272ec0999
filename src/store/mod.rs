//! The two external stores, each behind a small trait.
//!
//! Nothing outside this module names `s3::` or `redis::`, so the coordinator
//! and the workers can be reasoned about (and unit-tested) without either
//! server, and a failure mode of one client library stays in one file.

mod connection;
pub mod credentials;
pub mod redis;
pub mod s3;

pub use self::redis::{AssemblyProgress, CheckpointStore, RedisStore, StoredStatus, StoredStream};
pub use self::s3::{BucketError, Integrity, ObjectInfo, ObjectStore, OpenUpload, S3Store};
