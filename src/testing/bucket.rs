//! A bucket in memory, which can be told to fail or to panic.

use std::collections::BTreeMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::error::StorageError;
use crate::store::{ObjectInfo, ObjectStore};

/// An in-memory bucket that can be told to fail the next N puts.
#[derive(Default)]
pub struct MemoryStore {
    pub objects: Mutex<BTreeMap<String, Vec<u8>>>,
    pub failures_left: Mutex<u32>,
    /// Puts that panic (a stand-in for any bug in a job).
    pub panics_left: Mutex<u32>,
    pub puts: Mutex<u32>,
    pub uploads: Mutex<BTreeMap<String, MemoryUpload>>,
}

/// An upload in progress: (key, part number → bytes), by upload id.
pub type MemoryUpload = (String, BTreeMap<u32, Vec<u8>>);

fn missing(key: &str) -> StorageError {
    StorageError::Http {
        status: 404,
        key: key.into(),
        body: String::new(),
    }
}

impl ObjectStore for MemoryStore {
    fn put(&self, key: &str, body: &[u8], _: &str, digest: &[u8; 32]) -> Result<(), StorageError> {
        *self.puts.lock().unwrap() += 1;
        let panics = std::mem::replace(&mut *self.panics_left.lock().unwrap(), 0);
        if panics > 0 {
            *self.panics_left.lock().unwrap() = panics - 1;
            panic!("injected panic in put {key}");
        }
        let mut failures = self.failures_left.lock().unwrap();
        if *failures > 0 {
            *failures -= 1;
            return Err(StorageError::Http {
                status: 503,
                key: key.into(),
                body: "slow down".into(),
            });
        }
        assert_eq!(
            &<[u8; 32]>::from(Sha256::digest(body)),
            digest,
            "checksum header matches body"
        );
        self.objects
            .lock()
            .unwrap()
            .insert(key.into(), body.to_vec());
        Ok(())
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        self.objects
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .ok_or_else(|| missing(key))
    }
    fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Vec<u8>, StorageError> {
        let all = self.get(key)?;
        Ok(all[start as usize..=(end as usize).min(all.len() - 1)].to_vec())
    }
    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .get(key)
            .map(|body| ObjectInfo {
                size: body.len() as u64,
                etag: "\"memory\"".into(),
            }))
    }
    fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }
    fn initiate_multipart(&self, key: &str, _: &str) -> Result<String, StorageError> {
        let mut uploads = self.uploads.lock().unwrap();
        let id = format!("upload-{}", uploads.len());
        uploads.insert(id.clone(), (key.into(), BTreeMap::new()));
        Ok(id)
    }
    fn upload_part_copy(
        &self,
        key: &str,
        id: &str,
        part: u32,
        source: &str,
    ) -> Result<String, StorageError> {
        let body = self.get(source)?;
        let mut uploads = self.uploads.lock().unwrap();
        let upload = uploads
            .get_mut(id)
            .filter(|u| u.0 == key)
            .ok_or_else(|| missing(key))?;
        upload.1.insert(part, body);
        Ok(format!("\"part-{part}\""))
    }
    fn complete_multipart(
        &self,
        key: &str,
        id: &str,
        parts: &[(u32, String)],
    ) -> Result<String, StorageError> {
        let (_, copied) = self
            .uploads
            .lock()
            .unwrap()
            .remove(id)
            .ok_or_else(|| missing(key))?;
        assert_eq!(parts.len(), copied.len());
        let body: Vec<u8> = copied.into_values().flatten().collect();
        self.objects.lock().unwrap().insert(key.into(), body);
        Ok("\"whole-1\"".into())
    }
    fn abort_multipart(&self, _: &str, id: &str) -> Result<(), StorageError> {
        self.uploads.lock().unwrap().remove(id);
        Ok(())
    }
}
