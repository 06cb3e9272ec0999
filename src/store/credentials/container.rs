//! ECS task roles and EKS Pod Identity: the container credentials endpoint.

use super::{Fetched, from_json, read_trimmed};
use crate::config::ContainerEndpoint;

/// ECS task roles and EKS Pod Identity: a GET with the authorization token.
pub(super) fn container_credentials(
    container: &ContainerEndpoint,
    agent: &ureq::Agent,
) -> Result<Fetched, String> {
    let token = match (&container.token_file, &container.token) {
        (Some(file), _) => Some(read_trimmed(file)?),
        (None, token) => token.clone(),
    };
    let mut request = agent.get(&container.uri);
    if let Some(token) = &token {
        request = request.header("authorization", token);
    }
    let mut response = request
        .call()
        .map_err(|err| format!("{}: {err}", container.uri))?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    if status != 200 {
        return Err(format!("{} answered HTTP {status}", container.uri));
    }
    from_json(&body, &container.uri)
}
