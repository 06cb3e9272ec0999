//! EKS IRSA: `AssumeRoleWithWebIdentity` at `AWS_ENDPOINT_URL_STS` or the
//! regional STS endpoint (aws-creds hard-codes the host and sends a GET).

use super::{Fetched, parse_expiry, read_trimmed};
use crate::config::WebIdentity;
use crate::store::s3::{percent_encode, xml_value};

/// `AssumeRoleWithWebIdentity`, POSTed as a form as the AWS SDKs do (an
/// unsigned call: the token is the proof).
pub(super) fn web_identity(web: &WebIdentity, agent: &ureq::Agent) -> Result<Fetched, String> {
    let token = read_trimmed(&web.token_file)?;
    let form = format!(
        "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn={}&RoleSessionName={}&WebIdentityToken={}",
        percent_encode(&web.role_arn, b""),
        percent_encode(&web.session_name, b""),
        percent_encode(&token, b"")
    );
    let mut response = agent
        .post(&format!("{}/", web.sts_endpoint))
        .header("content-type", "application/x-www-form-urlencoded")
        .send(form.as_bytes())
        .map_err(|err| format!("STS at {}: {err}", web.sts_endpoint))?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    if status != 200 {
        return Err(format!(
            "STS at {} answered HTTP {status}: {}",
            web.sts_endpoint,
            xml_value(&body, "Message").unwrap_or_else(|| body.chars().take(200).collect())
        ));
    }
    let field = |tag: &str| xml_value(&body, tag).ok_or_else(|| format!("STS answer has no {tag}"));
    Ok(Fetched {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: field("SecretAccessKey")?,
        session_token: Some(field("SessionToken")?),
        expires: Some(parse_expiry(&field("Expiration")?)?),
    })
}
