//! An EC2 instance profile through instance metadata (IMDSv2 token flow).

use std::time::Duration;

use log::warn;

use super::{Fetched, from_json};

/// The instance-metadata service answers at once or not at all.
const IMDS_TIMEOUT: Duration = Duration::from_secs(2);

/// IMDSv2: a session token, the role name, then the role's credentials.
/// Any failure means "not on EC2" (`None`), as in the SDKs.
pub(super) fn instance_metadata(endpoint: &str, agent: &ureq::Agent) -> Option<Fetched> {
    let token = agent
        .put(&format!("{endpoint}/latest/api/token"))
        .config()
        .timeout_global(Some(IMDS_TIMEOUT))
        .build()
        .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
        .send_empty()
        .ok()
        .filter(|response| response.status() == 200)?
        .body_mut()
        .read_to_string()
        .ok()?;
    let get = |path: &str| -> Option<String> {
        let mut response = agent
            .get(&format!(
                "{endpoint}/latest/meta-data/iam/security-credentials/{path}"
            ))
            .header("x-aws-ec2-metadata-token", &token)
            .call()
            .ok()?;
        (response.status() == 200).then_some(())?;
        response.body_mut().read_to_string().ok()
    };
    let role = get("")?.lines().next()?.trim().to_string();
    match from_json(&get(&role)?, "instance metadata") {
        Ok(fetched) => Some(fetched),
        Err(err) => {
            warn!("credentials: {err}");
            None
        }
    }
}
