//! Static keys from the shared credentials and config files (`AWS_PROFILE`).

use std::collections::HashMap;
use std::path::PathBuf;

use super::Fetched;
use crate::config::CredentialChain;

/// The credentials file, then the config file (where the section of a
/// profile other than `default` is `[profile NAME]`).
pub(super) fn profile_paths(chain: &CredentialChain) -> Vec<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    vec![
        chain
            .shared_credentials_file
            .clone()
            .unwrap_or_else(|| home.join(".aws/credentials")),
        chain
            .config_file
            .clone()
            .unwrap_or_else(|| home.join(".aws/config")),
    ]
}

/// Static keys from the shared files. Profiles that assume a role or run a
/// process are not followed: they fail clearly rather than silently.
pub(super) fn profile(chain: &CredentialChain) -> Result<Option<Fetched>, String> {
    let paths = profile_paths(chain);
    let sections = [
        chain.profile.clone(),
        if chain.profile == "default" {
            "default".to_string()
        } else {
            format!("profile {}", chain.profile)
        },
    ];
    for (path, section) in paths.iter().zip(sections) {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        let Some(values) = ini_section(&text, &section) else {
            continue;
        };
        match (
            values.get("aws_access_key_id"),
            values.get("aws_secret_access_key"),
        ) {
            (Some(id), Some(secret)) => {
                return Ok(Some(Fetched {
                    access_key_id: id.clone(),
                    secret_access_key: secret.clone(),
                    session_token: values.get("aws_session_token").cloned(),
                    expires: None,
                }));
            }
            _ if values.keys().any(|key| {
                matches!(
                    key.as_str(),
                    "role_arn" | "credential_process" | "sso_session" | "sso_start_url"
                )
            }) =>
            {
                return Err(format!(
                    "profile {:?} in {} assumes a role or uses SSO or a credential process, which chunkstream does not follow; give it static keys, or use web identity or container credentials",
                    chain.profile,
                    path.display()
                ));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// The `key = value` pairs of `[section]` in an INI file.
fn ini_section(text: &str, section: &str) -> Option<HashMap<String, String>> {
    let mut current: Option<&str> = None;
    let mut values: Option<HashMap<String, String>> = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.trim());
            if current == Some(section) {
                values.get_or_insert_with(HashMap::new);
            }
            continue;
        }
        if current == Some(section)
            && let (Some(map), Some((key, value))) = (values.as_mut(), line.split_once('='))
        {
            map.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_sections_are_read_by_name() {
        let text = "[default]\naws_access_key_id = A\n# note\n[profile cam]\nAWS_SECRET_ACCESS_KEY=s = x\n";
        assert_eq!(
            ini_section(text, "default").unwrap()["aws_access_key_id"],
            "A"
        );
        assert_eq!(
            ini_section(text, "profile cam").unwrap()["aws_secret_access_key"],
            "s = x"
        );
        assert!(ini_section(text, "other").is_none());
    }
}
