//! CSI Identity: who the plugin is, what it offers, whether it is ready.

use tonic::{Request, Response, Status};

use crate::config::DriverName;
use crate::proto::csi::identity_server::Identity;
use crate::proto::csi::plugin_capability::{self, service};
use crate::proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// Which CSI services this process serves besides Identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Services {
    pub controller: bool,
    pub node: bool,
}

pub struct IdentityService {
    name: DriverName,
    services: Services,
}

impl IdentityService {
    pub fn new(name: DriverName, services: Services) -> Self {
        IdentityService { name, services }
    }

    fn capabilities(&self) -> Vec<PluginCapability> {
        let service = |t: service::Type| PluginCapability {
            r#type: Some(plugin_capability::Type::Service(
                plugin_capability::Service { r#type: t as i32 },
            )),
        };
        let mut caps = Vec::new();
        if self.services.controller {
            caps.push(service(service::Type::ControllerService));
        }
        caps
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
            capabilities: self.capabilities(),
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

    fn svc(services: Services) -> IdentityService {
        IdentityService::new("cryptdisk.csi.io".parse().unwrap(), services)
    }

    #[tokio::test]
    async fn plugin_info_names_the_driver_and_version() {
        let info = svc(Services::default())
            .get_plugin_info(Request::new(GetPluginInfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "cryptdisk.csi.io");
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    }

    #[tokio::test]
    async fn controller_capability_only_where_the_controller_is_served() {
        let caps = |s| async move {
            svc(s)
                .get_plugin_capabilities(Request::new(GetPluginCapabilitiesRequest {}))
                .await
                .unwrap()
                .into_inner()
                .capabilities
        };
        assert!(
            caps(Services {
                controller: false,
                node: true
            })
            .await
            .is_empty()
        );
        let with = caps(Services {
            controller: true,
            node: false,
        })
        .await;
        assert_eq!(with.len(), 1);
        assert!(matches!(
            with[0].r#type,
            Some(plugin_capability::Type::Service(plugin_capability::Service { r#type }))
                if r#type == service::Type::ControllerService as i32
        ));
    }

    #[tokio::test]
    async fn probe_is_ready() {
        let r = svc(Services::default())
            .probe(Request::new(ProbeRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.ready, Some(true));
    }
}
