//! CSI Identity: who the plugin is, what it offers, whether it is ready.

use tonic::{Request, Response, Status};

use crate::config::DriverName;
use crate::proto::csi::identity_server::Identity;
use crate::proto::csi::plugin_capability::{self, service};
use crate::proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// The plugin's capabilities. The spec asks every instance of a plugin to report
/// the same set, "the grand sum of all capabilities of all instances", whichever
/// services it serves itself: a node plugin answers as the controller does.
/// Volumes carry accessible topology (the local backend's node, a cloud zone), so
/// the CO must pass topology requirements to CreateVolume; they grow while in use.
pub fn plugin_capabilities() -> Vec<PluginCapability> {
    let service = |t: service::Type| PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    };
    vec![
        service(service::Type::ControllerService),
        service(service::Type::VolumeAccessibilityConstraints),
        PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: plugin_capability::volume_expansion::Type::Online as i32,
                },
            )),
        },
    ]
}

pub struct IdentityService {
    name: DriverName,
}

impl IdentityService {
    pub fn new(name: DriverName) -> Self {
        IdentityService { name }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.name.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: plugin_capabilities(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        // Nothing to warm up: once the socket accepts, the plugin is ready.
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> IdentityService {
        IdentityService::new("cryptdisk.csi.io".parse().unwrap())
    }

    #[tokio::test]
    async fn plugin_info_names_the_driver_and_version() {
        let info = svc()
            .get_plugin_info(Request::new(GetPluginInfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "cryptdisk.csi.io");
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    }

    #[tokio::test]
    async fn every_instance_reports_the_whole_plugin() {
        let caps = svc()
            .get_plugin_capabilities(Request::new(GetPluginCapabilitiesRequest {}))
            .await
            .unwrap()
            .into_inner()
            .capabilities;
        let types: Vec<i32> = caps
            .iter()
            .filter_map(|c| match c.r#type {
                Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
                _ => None,
            })
            .collect();
        assert_eq!(
            types,
            [
                service::Type::ControllerService as i32,
                service::Type::VolumeAccessibilityConstraints as i32
            ]
        );
        assert!(caps.iter().any(|c| matches!(
            c.r#type,
            Some(plugin_capability::Type::VolumeExpansion(e))
                if e.r#type == plugin_capability::volume_expansion::Type::Online as i32
        )));
    }

    #[tokio::test]
    async fn probe_is_ready() {
        let r = svc()
            .probe(Request::new(ProbeRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.ready, Some(true));
    }
}
