//! The controller's Azure configuration: the cloud config file that Azure's own
//! disk CSI driver and cloud-provider-azure read (`/etc/kubernetes/azure.json`),
//! overridden field by field by the standard environment variables, plus the
//! endpoint overrides tests and private clouds use.
//!
//! The client secret is read here and handed to `azure_identity` only; this
//! module's types have no `Debug` so that it cannot reach a log line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::cloud::retry::Retry;

/// Where the controller reads its Azure configuration by default.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/kubernetes/azure.json";
/// Replaces the ARM endpoint (`https://management.azure.com` in the public cloud).
pub const ENV_ARM_ENDPOINT: &str = "CRYPTDISK_AZURE_ARM_ENDPOINT";
/// Replaces the Microsoft Entra ID authority host (also read by azure_identity).
pub const ENV_AUTHORITY_HOST: &str = "AZURE_AUTHORITY_HOST";
/// Replaces the Instance Metadata Service endpoint (shared with the KMS unwrap).
pub const ENV_IMDS_ENDPOINT: &str = "CRYPTDISK_AZURE_IMDS_ENDPOINT";

/// Which Azure cloud: decides the ARM endpoint, the token audience and the
/// authority host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cloud {
    Public,
    UsGovernment,
    China,
}

impl Cloud {
    /// The `cloud` field of azure.json (`AzurePublicCloud`, ...), case-insensitive;
    /// empty is the public cloud.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "" | "azurepubliccloud" | "azurecloud" => Ok(Cloud::Public),
            "azureusgovernmentcloud" | "azureusgovernment" => Ok(Cloud::UsGovernment),
            "azurechinacloud" => Ok(Cloud::China),
            _ => Err(format!(
                "cloud {:?} is not one of AzurePublicCloud, AzureUSGovernmentCloud, AzureChinaCloud",
                name.trim()
            )),
        }
    }

    pub fn arm_endpoint(self) -> &'static str {
        match self {
            Cloud::Public => "https://management.azure.com",
            Cloud::UsGovernment => "https://management.usgovcloudapi.net",
            Cloud::China => "https://management.chinacloudapi.cn",
        }
    }

    pub fn authority_host(self) -> &'static str {
        match self {
            Cloud::Public => "https://login.microsoftonline.com",
            Cloud::UsGovernment => "https://login.microsoftonline.us",
            Cloud::China => "https://login.chinacloudapi.cn",
        }
    }
}

/// `vmType` of azure.json, as cloud-provider-azure reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmType {
    /// `standard` (or unset): standalone VMs, attached to through
    /// `Microsoft.Compute/virtualMachines/{name}`.
    Standard,
    /// `vmss`: Virtual Machine Scale Sets in Uniform orchestration (AKS node
    /// pools). A node named `<scale set>_<instance id>` (the name IMDS gives a
    /// Uniform instance) is updated through
    /// `virtualMachineScaleSets/{ss}/virtualMachines/{instance id}`; any other
    /// node as a standalone VM, as cloud-provider-azure falls back to
    /// availability-set VMs in a `vmss` cluster.
    Vmss,
    /// `vmssflex`: Flexible scale sets, whose instances are ordinary VMs.
    VmssFlex,
}

/// How to get ARM tokens, in the order they are chosen.
pub enum Credentials {
    /// Workload identity: a federated token file exchanged at Entra ID.
    WorkloadIdentity {
        tenant_id: String,
        client_id: String,
        token_file: PathBuf,
    },
    /// A service principal's client secret.
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret: Zeroizing<String>,
    },
    /// The VM's managed identity through IMDS (a user-assigned one when given).
    ManagedIdentity { client_id: Option<String> },
}

impl Credentials {
    /// What kind, for logs (never the secret).
    pub fn describe(&self) -> &'static str {
        match self {
            Credentials::WorkloadIdentity { .. } => "workload identity (federated token)",
            Credentials::ClientSecret { .. } => "client secret",
            Credentials::ManagedIdentity { .. } => "managed identity (IMDS)",
        }
    }
}

/// Everything the Azure backend needs to reach ARM.
pub struct AzureConfig {
    pub tenant_id: String,
    pub subscription_id: String,
    /// Resource group of the VMs, and of disks unless a StorageClass names another.
    pub resource_group: String,
    /// Region of new disks (e.g. `eastus`), lower case.
    pub location: String,
    pub vm_type: VmType,
    pub cloud: Cloud,
    pub credentials: Credentials,
    /// ARM base URL, without a trailing slash.
    pub arm_endpoint: String,
    /// Entra ID authority host, without a trailing slash.
    pub authority_host: String,
    /// The driver name, recorded in every disk's and snapshot's tags.
    pub driver_name: String,
    /// Retries of throttled (429) and failed (5xx, connection) requests.
    pub retry: Retry,
    /// Wait between polls of a long-running operation when ARM's answer has no
    /// `Retry-After` (one it gives is honoured, up to `retry.max_delay`).
    pub poll_interval: Duration,
    /// Longest a long-running operation is waited for before the call answers
    /// UNAVAILABLE for the CO to retry.
    pub operation_timeout: Duration,
    /// Time limit of each HTTP request.
    pub request_timeout: Duration,
}

/// azure.json as cloud-provider-azure writes it; unknown fields are ignored.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct CloudConfigFile {
    cloud: String,
    tenant_id: String,
    subscription_id: String,
    resource_group: String,
    location: String,
    vm_type: String,
    aad_client_id: String,
    aad_client_secret: String,
    use_managed_identity_extension: bool,
    #[serde(rename = "userAssignedIdentityID")]
    user_assigned_identity_id: String,
    aad_federated_token_file: String,
    use_federated_workload_identity_extension: bool,
}

impl AzureConfig {
    /// Reads `path` (when it exists) and the process environment.
    pub fn load(path: &Path, driver_name: &str) -> Result<Self, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        Self::from_parts(
            text.as_deref(),
            &path.display().to_string(),
            |name| std::env::var(name).ok(),
            driver_name,
        )
    }

    /// The configuration from azure.json's text (if any) and environment
    /// variables read through `var` (empty ones count as unset).
    pub fn from_parts(
        file: Option<&str>,
        file_name: &str,
        var: impl Fn(&str) -> Option<String>,
        driver_name: &str,
    ) -> Result<Self, String> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let f: CloudConfigFile = match file {
            Some(text) => serde_json::from_str(text)
                // serde's message names the field and line, never a value.
                .map_err(|e| format!("{file_name} is not a valid azure.json: {e}"))?,
            None => CloudConfigFile::default(),
        };
        let pick = |env: &str, from_file: &str| -> String {
            var(env).unwrap_or_else(|| from_file.trim().to_string())
        };
        let cloud = Cloud::parse(&pick("AZURE_ENVIRONMENT", &f.cloud))?;
        let tenant_id = pick("AZURE_TENANT_ID", &f.tenant_id);
        let subscription_id = pick("AZURE_SUBSCRIPTION_ID", &f.subscription_id);
        let resource_group = pick("AZURE_RESOURCE_GROUP", &f.resource_group);
        let location = pick("AZURE_LOCATION", &f.location).to_ascii_lowercase();
        let vm_type = match pick("AZURE_VM_TYPE", &f.vm_type)
            .to_ascii_lowercase()
            .as_str()
        {
            "" | "standard" => VmType::Standard,
            "vmss" => VmType::Vmss,
            "vmssflex" => VmType::VmssFlex,
            other => {
                return Err(format!(
                    "vmType {other:?} is not \"standard\", \"vmss\" (Uniform scale sets) or \
                     \"vmssflex\" (Flexible scale sets)"
                ));
            }
        };
        let missing = |what: &str, env: &str| {
            format!("no {what}: set it in {file_name} or in the environment variable {env}")
        };
        for (value, what, env) in [
            (&subscription_id, "subscriptionId", "AZURE_SUBSCRIPTION_ID"),
            (&resource_group, "resourceGroup", "AZURE_RESOURCE_GROUP"),
            (&location, "location", "AZURE_LOCATION"),
        ] {
            if value.is_empty() {
                return Err(missing(what, env));
            }
        }
        check_arm_name("subscriptionId", &subscription_id)?;
        check_arm_name("resourceGroup", &resource_group)?;
        check_arm_name("location", &location)?;
        if !tenant_id.is_empty() {
            check_arm_name("tenantId", &tenant_id)?;
        }

        let client_id = var("AZURE_CLIENT_ID").or_else(|| {
            [&f.user_assigned_identity_id, &f.aad_client_id]
                .into_iter()
                .map(|s| s.trim())
                .find(|s| !s.is_empty())
                .map(str::to_string)
        });
        let token_file = var("AZURE_FEDERATED_TOKEN_FILE").or_else(|| {
            let file = f.aad_federated_token_file.trim();
            if !file.is_empty() {
                Some(file.to_string())
            } else if f.use_federated_workload_identity_extension {
                // The path the workload identity webhook mounts.
                Some("/var/run/secrets/azure/tokens/azure-identity-token".to_string())
            } else {
                None
            }
        });
        let secret = var("AZURE_CLIENT_SECRET")
            .or_else(|| (!f.aad_client_secret.is_empty()).then(|| f.aad_client_secret.clone()))
            .map(Zeroizing::new);
        let need_tenant = |how: &str| -> Result<String, String> {
            if tenant_id.is_empty() {
                Err(missing(
                    &format!("tenantId (needed for {how})"),
                    "AZURE_TENANT_ID",
                ))
            } else {
                Ok(tenant_id.clone())
            }
        };
        let credentials = if let Some(token_file) = token_file {
            let client_id = client_id
                .clone()
                .ok_or_else(|| missing("client id for workload identity", "AZURE_CLIENT_ID"))?;
            Credentials::WorkloadIdentity {
                tenant_id: need_tenant("workload identity")?,
                client_id,
                token_file: PathBuf::from(token_file),
            }
        } else {
            match secret {
                Some(secret) if !f.use_managed_identity_extension => {
                    let client_id = client_id.clone().ok_or_else(|| {
                        missing("aadClientId for the client secret", "AZURE_CLIENT_ID")
                    })?;
                    Credentials::ClientSecret {
                        tenant_id: need_tenant("a client secret")?,
                        client_id,
                        secret,
                    }
                }
                _ => Credentials::ManagedIdentity {
                    client_id: client_id.clone(),
                },
            }
        };
        let trim = |s: String| s.trim_end_matches('/').to_string();
        Ok(AzureConfig {
            tenant_id,
            subscription_id,
            resource_group,
            location,
            vm_type,
            cloud,
            credentials,
            arm_endpoint: trim(
                var(ENV_ARM_ENDPOINT).unwrap_or_else(|| cloud.arm_endpoint().to_string()),
            ),
            authority_host: trim(
                var(ENV_AUTHORITY_HOST).unwrap_or_else(|| cloud.authority_host().to_string()),
            ),
            driver_name: driver_name.to_string(),
            retry: Retry {
                max_attempts: 6,
                base_delay: Duration::from_secs(1),
                max_delay: Duration::from_secs(30),
            },
            poll_interval: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(600),
            request_timeout: Duration::from_secs(30),
        })
    }

    /// The Entra ID scope of ARM tokens.
    pub fn arm_scope(&self) -> String {
        format!("{}/.default", self.cloud.arm_endpoint())
    }
}

/// The IMDS base URL: `CRYPTDISK_AZURE_IMDS_ENDPOINT`, or the link-local default.
pub fn imds_endpoint(var: impl Fn(&str) -> Option<String>) -> String {
    var(ENV_IMDS_ENDPOINT)
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| crate::cloud::AZURE_IMDS_URL.to_string())
        .trim_end_matches('/')
        .to_string()
}

/// Subscription ids, resource groups, locations and tenant ids go into URL paths:
/// only the characters ARM allows in them (resource groups may also hold `(`, `)`,
/// which the volume id cannot carry).
fn check_arm_name(what: &str, value: &str) -> Result<(), String> {
    let ok = value.len() <= 90
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {:?} must be at most 90 letters, digits, '-', '_' or '.'",
            value.chars().take(64).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const FILE: &str = r#"{
        "cloud": "AzurePublicCloud",
        "tenantId": "t-1",
        "subscriptionId": "sub-1",
        "resourceGroup": "MC_rg_aks_eastus",
        "location": "EastUS",
        "vmType": "vmss",
        "aadClientId": "app-1",
        "aadClientSecret": "s3cret",
        "useManagedIdentityExtension": false,
        "someOtherField": 42
    }"#;

    #[test]
    fn reads_azure_json_with_a_client_secret() {
        let c = AzureConfig::from_parts(Some(FILE), "azure.json", env(&[]), "d").unwrap();
        assert_eq!(c.subscription_id, "sub-1");
        assert_eq!(c.resource_group, "MC_rg_aks_eastus");
        assert_eq!(c.location, "eastus");
        assert_eq!(c.vm_type, VmType::Vmss);
        assert_eq!(c.arm_endpoint, "https://management.azure.com");
        assert_eq!(c.arm_scope(), "https://management.azure.com/.default");
        match &c.credentials {
            Credentials::ClientSecret {
                tenant_id,
                client_id,
                secret,
            } => {
                assert_eq!(tenant_id, "t-1");
                assert_eq!(client_id, "app-1");
                assert_eq!(secret.as_str(), "s3cret");
            }
            other => panic!("{}", other.describe()),
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = AzureConfig::from_parts(
            Some(FILE),
            "azure.json",
            env(&[
                ("AZURE_SUBSCRIPTION_ID", "sub-2"),
                ("AZURE_CLIENT_ID", "wi-client"),
                ("AZURE_FEDERATED_TOKEN_FILE", "/tok"),
                (ENV_ARM_ENDPOINT, "http://127.0.0.1:9/"),
                (ENV_AUTHORITY_HOST, "https://login.example/"),
            ]),
            "d",
        )
        .unwrap();
        assert_eq!(c.subscription_id, "sub-2");
        assert_eq!(c.arm_endpoint, "http://127.0.0.1:9");
        assert_eq!(c.authority_host, "https://login.example");
        match &c.credentials {
            Credentials::WorkloadIdentity {
                client_id,
                token_file,
                ..
            } => {
                assert_eq!(client_id, "wi-client");
                assert_eq!(token_file, Path::new("/tok"));
            }
            other => panic!("{}", other.describe()),
        }
    }

    #[test]
    fn managed_identity_when_asked_or_without_a_secret() {
        let file = r#"{"subscriptionId":"s","resourceGroup":"rg","location":"westeurope",
            "useManagedIdentityExtension":true,"userAssignedIdentityID":"mi-1",
            "aadClientId":"x","aadClientSecret":"y"}"#;
        let c = AzureConfig::from_parts(Some(file), "f", env(&[]), "d").unwrap();
        assert!(matches!(
            &c.credentials,
            Credentials::ManagedIdentity { client_id: Some(id) } if id == "mi-1"
        ));
        let c = AzureConfig::from_parts(
            None,
            "f",
            env(&[
                ("AZURE_SUBSCRIPTION_ID", "s"),
                ("AZURE_RESOURCE_GROUP", "rg"),
                ("AZURE_LOCATION", "westeurope"),
            ]),
            "d",
        )
        .unwrap();
        assert!(matches!(
            &c.credentials,
            Credentials::ManagedIdentity { client_id: None }
        ));
    }

    #[test]
    fn bad_configurations_say_what_is_wrong() {
        let err = |file: &str, vars: &[(&str, &str)]| {
            AzureConfig::from_parts(Some(file), "azure.json", env(vars), "d")
                .err()
                .expect("an error")
        };
        assert!(err("{", &[]).contains("not a valid azure.json"));
        assert!(err("{}", &[]).contains("no subscriptionId"));
        let base = r#"{"subscriptionId":"s","resourceGroup":"rg","location":"l""#;
        assert!(err(&format!("{base},\"vmType\":\"uniform\"}}"), &[]).contains("vmType"));
        assert!(err(&format!("{base},\"cloud\":\"Mars\"}}"), &[]).contains("Mars"));
        assert!(
            err(
                &format!("{base},\"aadClientId\":\"a\",\"aadClientSecret\":\"b\"}}"),
                &[]
            )
            .contains("tenantId")
        );
        let e = err(
            r#"{"subscriptionId":"s","resourceGroup":"rg/../x","location":"l"}"#,
            &[],
        );
        assert!(e.contains("resourceGroup"), "{e}");
        // A secret never appears in an error.
        let e = err(
            &format!("{base},\"aadClientId\":\"a\",\"aadClientSecret\":\"TOPSECRET\"}}"),
            &[],
        );
        assert!(!e.contains("TOPSECRET"));
    }

    #[test]
    fn imds_endpoint_override() {
        assert_eq!(imds_endpoint(env(&[])), "http://169.254.169.254");
        assert_eq!(
            imds_endpoint(env(&[(ENV_IMDS_ENDPOINT, "http://127.0.0.1:1/")])),
            "http://127.0.0.1:1"
        );
    }
}
