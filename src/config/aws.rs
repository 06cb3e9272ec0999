//! The AWS side of the S3 settings: where credentials come from after the
//! environment (web identity, profile files, container endpoint, instance
//! metadata) and the policy headers every object carries (SSE, storage
//! class, Object Lock, tags). Kept apart from `stores` so each file stays
//! readable; validated from [`Settings`] with errors that name the variable.

use super::stores::given;
use super::*;

/// The sources of the AWS credential chain after the environment, in the
/// SDKs' order (see `crate::credentials`).
#[derive(Debug, Clone, Default)]
pub struct CredentialChain {
    pub web_identity: Option<WebIdentity>,
    /// `AWS_PROFILE`, `default` when unset.
    pub profile: String,
    /// `None`: `~/.aws/credentials`.
    pub shared_credentials_file: Option<PathBuf>,
    /// `None`: `~/.aws/config`.
    pub config_file: Option<PathBuf>,
    pub container: Option<ContainerEndpoint>,
    /// The IMDS base URL; `None` when `AWS_EC2_METADATA_DISABLED=true`.
    pub imds_endpoint: Option<String>,
}

/// `AssumeRoleWithWebIdentity` (EKS IRSA).
#[derive(Debug, Clone)]
pub struct WebIdentity {
    pub role_arn: String,
    pub token_file: PathBuf,
    pub session_name: String,
    pub sts_endpoint: String,
}

/// The ECS / EKS Pod Identity credentials endpoint.
#[derive(Clone)]
pub struct ContainerEndpoint {
    pub uri: String,
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN`; never shown.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for ContainerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerEndpoint")
            .field("uri", &self.uri)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// How the HTTPS clients to S3, STS and the credential endpoints trust
/// servers (`AWS_CA_BUNDLE`, `S3_INSECURE_TLS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum S3Tls {
    /// Mozilla's web roots, built in.
    #[default]
    WebRoots,
    /// The system's roots plus the CAs in this PEM bundle.
    CaBundle(PathBuf),
    /// No verification at all.
    Insecure,
}

impl S3Tls {
    pub(super) fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let insecure = parse_bool("S3_INSECURE_TLS", &settings.s3_insecure_tls)?;
        match (given(&settings.aws_ca_bundle), insecure) {
            (Some(_), true) => Err(ConfigError {
                variable: "S3_INSECURE_TLS",
                reason: "set together with AWS_CA_BUNDLE; trust the CA with AWS_CA_BUNDLE, or skip verification with S3_INSECURE_TLS=true, not both".into(),
            }),
            (Some(bundle), false) => Ok(S3Tls::CaBundle(PathBuf::from(bundle))),
            (None, true) => Ok(S3Tls::Insecure),
            (None, false) => Ok(S3Tls::WebRoots),
        }
    }
}

/// Headers every object written carries (`S3_SSE`, `S3_STORAGE_CLASS`,
/// `S3_OBJECT_LOCK_*`, `S3_TAGS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectPolicy {
    pub sse: Option<Sse>,
    pub storage_class: Option<String>,
    pub object_lock: Option<ObjectLock>,
    pub tags: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    Aes256,
    Kms { key_id: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectLock {
    /// `GOVERNANCE` or `COMPLIANCE`.
    pub mode: String,
    pub retain: Duration,
}

/// An optional URL setting: `None` when unset, else an http(s) URL.
fn optional_url(
    variable: &'static str,
    value: &Option<String>,
) -> Result<Option<String>, ConfigError> {
    match given(value) {
        None => Ok(None),
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
            Ok(Some(url.trim_end_matches('/').to_string()))
        }
        Some(url) => Err(ConfigError::bad_value(
            variable,
            url,
            "expected an http:// or https:// URL",
        )),
    }
}

impl CredentialChain {
    pub(super) fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let region = settings.s3_region.trim();
        let web_identity = match (
            given(&settings.aws_role_arn),
            given(&settings.aws_web_identity_token_file),
        ) {
            (Some(role_arn), Some(token_file)) => Some(WebIdentity {
                role_arn: role_arn.to_string(),
                token_file: PathBuf::from(token_file),
                session_name: given(&settings.aws_role_session_name)
                    .unwrap_or("chunkstream")
                    .to_string(),
                sts_endpoint: optional_url("AWS_ENDPOINT_URL_STS", &settings.aws_endpoint_url_sts)?
                    .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com")),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError {
                    variable: "AWS_WEB_IDENTITY_TOKEN_FILE",
                    reason: "missing while AWS_ROLE_ARN is set".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError {
                    variable: "AWS_ROLE_ARN",
                    reason: "missing while AWS_WEB_IDENTITY_TOKEN_FILE is set".into(),
                });
            }
        };
        let full = optional_url(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            &settings.aws_container_credentials_full_uri,
        )?;
        let relative = given(&settings.aws_container_credentials_relative_uri)
            .map(|path| format!("http://169.254.170.2/{}", path.trim_start_matches('/')));
        let container = relative.or(full).map(|uri| ContainerEndpoint {
            uri,
            token: given(&settings.aws_container_authorization_token).map(str::to_string),
            token_file: given(&settings.aws_container_authorization_token_file).map(PathBuf::from),
        });
        let imds_disabled = parse_bool(
            "AWS_EC2_METADATA_DISABLED",
            &settings.aws_ec2_metadata_disabled,
        )?;
        let imds_endpoint = optional_url(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            &settings.aws_ec2_metadata_service_endpoint,
        )?
        .unwrap_or_else(|| "http://169.254.169.254".to_string());
        Ok(Self {
            web_identity,
            profile: given(&settings.aws_profile)
                .unwrap_or("default")
                .to_string(),
            shared_credentials_file: given(&settings.aws_shared_credentials_file)
                .map(PathBuf::from),
            config_file: given(&settings.aws_config_file).map(PathBuf::from),
            container,
            imds_endpoint: (!imds_disabled).then_some(imds_endpoint),
        })
    }
}

impl ObjectPolicy {
    pub(super) fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let kms_key = settings.s3_sse_kms_key_id.trim();
        let sse = match settings.s3_sse.trim() {
            "" => None,
            "AES256" => Some(Sse::Aes256),
            "aws:kms" => Some(Sse::Kms {
                key_id: (!kms_key.is_empty()).then(|| kms_key.to_string()),
            }),
            other => {
                return Err(ConfigError::bad_value(
                    "S3_SSE",
                    other,
                    "expected AES256 or aws:kms",
                ));
            }
        };
        if !kms_key.is_empty() && !matches!(sse, Some(Sse::Kms { .. })) {
            return Err(ConfigError::bad_value(
                "S3_SSE_KMS_KEY_ID",
                kms_key,
                "only with S3_SSE=aws:kms",
            ));
        }
        let storage_class = settings.s3_storage_class.trim();
        if !storage_class
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(ConfigError::bad_value(
                "S3_STORAGE_CLASS",
                storage_class,
                "expected a storage class name such as STANDARD_IA or GLACIER_IR",
            ));
        }
        let retain = settings.s3_object_lock_retain.trim();
        let object_lock = match settings.s3_object_lock_mode.trim() {
            "" if retain.is_empty() => None,
            "" => {
                return Err(ConfigError {
                    variable: "S3_OBJECT_LOCK_MODE",
                    reason: "missing while S3_OBJECT_LOCK_RETAIN is set".into(),
                });
            }
            mode @ ("GOVERNANCE" | "COMPLIANCE") => Some(ObjectLock {
                mode: mode.to_string(),
                retain: parse_duration("S3_OBJECT_LOCK_RETAIN", retain)?,
            }),
            other => {
                return Err(ConfigError::bad_value(
                    "S3_OBJECT_LOCK_MODE",
                    other,
                    "expected GOVERNANCE or COMPLIANCE",
                ));
            }
        };
        let mut tags = Vec::new();
        for pair in settings
            .s3_tags
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            match pair.split_once('=') {
                Some((key, value)) if !key.trim().is_empty() => {
                    tags.push((key.trim().to_string(), value.trim().to_string()));
                }
                _ => {
                    return Err(ConfigError::bad_value(
                        "S3_TAGS",
                        &settings.s3_tags,
                        "expected key=value pairs separated by commas",
                    ));
                }
            }
        }
        Ok(Self {
            sse,
            storage_class: (!storage_class.is_empty()).then(|| storage_class.to_string()),
            object_lock,
            tags,
        })
    }
}
