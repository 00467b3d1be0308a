//! `--authorizer kubernetes`: who the caller is, from a TokenReview of its
//! bound ServiceAccount token, and whether the volume is attached to that
//! node, from a watch-fed cache of VolumeAttachments and PersistentVolumes.
//!
//! A key is granted iff a VolumeAttachment with `spec.attacher` = our driver,
//! `spec.nodeName` = the caller's node and `status.attached` = true names
//! (`spec.source.persistentVolumeName`) a PersistentVolume of our driver whose
//! `spec.csi.volumeHandle` is the requested volume id. The key scope is that
//! PV's [`SCOPE_ATTRIBUTE`] volume attribute, or the volume id when absent.
//!
//! The caches are kube-rs reflector stores, fed by a list-then-watch loop of
//! our own rather than kube-runtime's `watcher`: that one swallows bookmarks
//! and silent re-watches, so a quiet healthy cluster could not be told from a
//! dead API server. Ours notes the time of every list, watch start, event and
//! bookmark, and the authorizer fails closed (UNAVAILABLE) when that is older
//! than the staleness bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::reflector::store::{Store, Writer};
use kube::runtime::watcher;
use sha2::{Digest, Sha256};

use super::authz::{Authorizer, Denial, Grant, SCOPE_ATTRIBUTE};

/// The user-info extra a bound token carries: the node of the pod it is bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Longest a TokenReview result is reused (the token's own expiry may be sooner).
pub const REVIEW_CACHE_TTL: Duration = Duration::from_secs(60);
/// Most TokenReview results held; a node has one token at a time, so this is
/// far above any cluster's node count, and bounds what bad callers can fill.
pub const REVIEW_CACHE_CAPACITY: usize = 8192;
/// Longest one TokenReview may take before the request is answered UNAVAILABLE.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the authorizer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--node-service-account {0:?}: expected NAMESPACE/NAME")]
    BadAccount(String),
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("no in-cluster Kubernetes configuration ({0}); outside a cluster, pass --kubeconfig")]
    InCluster(String),
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// The service account whose tokens may ask for keys: the node plugin's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAccount {
    pub namespace: String,
    pub name: String,
}

impl NodeAccount {
    /// The user name TokenReview reports for this account's tokens.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for NodeAccount {
    type Err = SetupError;
    fn from_str(s: &str) -> Result<Self, SetupError> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(NodeAccount {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(SetupError::BadAccount(s.to_string())),
        }
    }
}

/// What the authorizer checks against.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The audience node tokens must be issued for (`--token-audience`).
    pub audience: String,
    pub node_account: NodeAccount,
    /// The CSI driver name: VolumeAttachments' attacher, PVs' `spec.csi.driver`.
    pub driver: String,
    /// Oldest the caches may be before every request is answered UNAVAILABLE.
    pub max_staleness: Duration,
}

/// A Kubernetes client from `kubeconfig`, or from the pod's in-cluster config.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, SetupError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let err = |message: String| SetupError::Kubeconfig {
                path: path.display().to_string(),
                message,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| err(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| SetupError::InCluster(e.to_string()))?,
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    kube::Client::try_from(config).map_err(|e| SetupError::Client(e.to_string()))
}

/// The caches' view of the cluster and how fresh it is.
#[derive(Clone)]
pub struct ClusterView {
    attachments: Store<VolumeAttachment>,
    volumes: Store<PersistentVolume>,
    attachments_live: Arc<Liveness>,
    volumes_live: Arc<Liveness>,
}

/// When a cache last heard from the API server (a list, a watch start, an
/// event or a bookmark); `None` until its first list.
#[derive(Default)]
pub struct Liveness(Mutex<Option<Instant>>);

impl Liveness {
    pub fn touch(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn last(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writing ends of a [`ClusterView`]: what the watch loops (or a test) fill.
pub struct ViewWriters {
    pub attachments: Writer<VolumeAttachment>,
    pub volumes: Writer<PersistentVolume>,
    pub attachments_live: Arc<Liveness>,
    pub volumes_live: Arc<Liveness>,
}

impl ClusterView {
    /// An empty, never-synced view and the writers that fill it.
    pub fn new() -> (ClusterView, ViewWriters) {
        let attachments = Writer::<VolumeAttachment>::default();
        let volumes = Writer::<PersistentVolume>::default();
        let (attachments_live, volumes_live) = (Arc::default(), Arc::default());
        let view = ClusterView {
            attachments: attachments.as_reader(),
            volumes: volumes.as_reader(),
            attachments_live: Arc::clone(&attachments_live),
            volumes_live: Arc::clone(&volumes_live),
        };
        let writers = ViewWriters {
            attachments,
            volumes,
            attachments_live,
            volumes_live,
        };
        (view, writers)
    }

    /// Fails closed unless both caches have listed once and heard from the API
    /// server within `max_staleness`.
    pub fn check_fresh(&self, max_staleness: Duration) -> Result<(), Denial> {
        for (what, live) in [
            ("VolumeAttachments", &self.attachments_live),
            ("PersistentVolumes", &self.volumes_live),
        ] {
            match live.last() {
                None => {
                    return Err(Denial::Unavailable(format!(
                        "the {what} cache has not synced with the API server yet"
                    )));
                }
                Some(at) if at.elapsed() > max_staleness => {
                    return Err(Denial::Unavailable(format!(
                        "the {what} cache last heard from the API server {:.0} s ago (bound: {} s)",
                        at.elapsed().as_secs_f64(),
                        max_staleness.as_secs()
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The key scope of `volume_id` if it is attached to `node` by `driver`
    /// (the decision itself; freshness is checked apart).
    pub fn decide(&self, driver: &str, node: &str, volume_id: &str) -> Result<String, Denial> {
        let not_attached = || Denial::NotAttached {
            node: node.to_string(),
            volume: volume_id.to_string(),
        };
        let mut scopes: Vec<String> = self
            .attachments
            .state_filter(|va| {
                va.spec.attacher == driver
                    && va.spec.node_name == node
                    && va.status.as_ref().is_some_and(|s| s.attached)
            })
            .iter()
            .filter_map(|va| va.spec.source.persistent_volume_name.as_deref())
            .filter_map(|pv| {
                self.volumes
                    .get(&kube::runtime::reflector::ObjectRef::new(pv))
            })
            .filter_map(|pv| {
                let csi = pv.spec.as_ref()?.csi.as_ref()?;
                (csi.driver == driver && csi.volume_handle == volume_id).then(|| {
                    csi.volume_attributes
                        .as_ref()
                        .and_then(|a| a.get(SCOPE_ATTRIBUTE))
                        .cloned()
                        .unwrap_or_else(|| volume_id.to_string())
                })
            })
            .collect();
        scopes.sort();
        scopes.dedup();
        match scopes.len() {
            0 => Err(not_attached()),
            1 => Ok(scopes.remove(0)),
            // Two PVs of one handle with different scopes, both attached here:
            // the cluster's records disagree about which key this volume has.
            _ => Err(Denial::Unavailable(format!(
                "volume {volume_id}: the PersistentVolumes attached to node {node} name \
                 {} different key scopes; fix the PVs' {SCOPE_ATTRIBUTE} attribute",
                scopes.len()
            ))),
        }
    }
}

/// Keeps one reflector store in step with the API server: list, then watch
/// from the list's resource version in bounded rounds (so a quiet, healthy
/// cluster still shows life at least every `round`), re-listing when the
/// version has expired. Runs until the process ends.
pub async fn keep_synced<K>(
    api: Api<K>,
    mut writer: Writer<K>,
    live: Arc<Liveness>,
    round: Duration,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let kind = K::kind(&());
    let retry = Duration::from_secs(1);
    let round_secs = round.as_secs().clamp(1, 290) as u32;
    loop {
        let rv = match list_into(&api, &mut writer).await {
            Ok(rv) => {
                live.touch();
                tracing::debug!(%kind, "listed");
                rv
            }
            Err(e) => {
                tracing::warn!(%kind, error = %e, "listing for the authorization cache failed; retrying");
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        let mut rv = rv;
        // Watch rounds until the version expires (then re-list).
        'watching: loop {
            let params = WatchParams::default().timeout(round_secs);
            let stream = match api.watch(&params, &rv).await {
                Ok(s) => s,
                Err(kube::Error::Api(status)) if status.code == 410 => break 'watching,
                Err(e) => {
                    tracing::warn!(%kind, error = %e, "watch for the authorization cache failed; retrying");
                    tokio::time::sleep(retry).await;
                    continue;
                }
            };
            live.touch();
            let mut stream = std::pin::pin!(stream);
            loop {
                // The server ends the round itself; a round that outlives it by
                // far is a dead connection.
                let next =
                    tokio::time::timeout(round + Duration::from_secs(5), stream.next()).await;
                match next {
                    Err(_) => {
                        tracing::warn!(%kind, "watch went silent; starting a new one");
                        continue 'watching;
                    }
                    Ok(None) => continue 'watching,
                    Ok(Some(Ok(event))) => match event {
                        WatchEvent::Added(obj) | WatchEvent::Modified(obj) => {
                            rv = obj.meta().resource_version.clone().unwrap_or(rv);
                            writer.apply_watcher_event(&watcher::Event::Apply(obj));
                            live.touch();
                        }
                        WatchEvent::Deleted(obj) => {
                            rv = obj.meta().resource_version.clone().unwrap_or(rv);
                            writer.apply_watcher_event(&watcher::Event::Delete(obj));
                            live.touch();
                        }
                        WatchEvent::Bookmark(bookmark) => {
                            rv = bookmark.metadata.resource_version;
                            live.touch();
                        }
                        WatchEvent::Error(status) if status.code == 410 => break 'watching,
                        WatchEvent::Error(status) => {
                            tracing::warn!(%kind, error = %status.message, "watch error; starting a new one");
                            tokio::time::sleep(retry).await;
                            continue 'watching;
                        }
                    },
                    Ok(Some(Err(e))) => {
                        tracing::warn!(%kind, error = %e, "watch broke; starting a new one");
                        tokio::time::sleep(retry).await;
                        continue 'watching;
                    }
                }
            }
        }
        tracing::info!(%kind, "watch version expired; listing again");
    }
}

/// Lists every object in pages and replaces the store's content with them (the
/// store keeps its old content until the list is whole); the list's version.
async fn list_into<K>(api: &Api<K>, writer: &mut Writer<K>) -> Result<String, kube::Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut objects = Vec::new();
    let mut params = ListParams::default().limit(500);
    let rv = loop {
        let page = api.list(&params).await?;
        objects.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break page.metadata.resource_version.unwrap_or_default(),
        }
    };
    writer.apply_watcher_event(&watcher::Event::Init);
    for obj in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(obj));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    Ok(rv)
}

/// The node a TokenReview's answer proves the caller to be, if the token was
/// issued for `audience` to `account` and bound to a pod on a node.
pub fn node_of_review(
    status: &TokenReviewStatus,
    audience: &str,
    account: &NodeAccount,
) -> Result<String, Denial> {
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("not authenticated");
        return Err(Denial::BadToken(why.to_string()));
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience))
    {
        return Err(Denial::BadToken(format!(
            "the token is not for audience {audience:?}"
        )));
    }
    let user = status
        .user
        .as_ref()
        .ok_or_else(|| Denial::BadToken("the TokenReview named no user".to_string()))?;
    let username = user.username.as_deref().unwrap_or("");
    if username != account.username() {
        return Err(Denial::WrongAccount(username.to_string()));
    }
    let node = user
        .extra
        .as_ref()
        .and_then(|extra| extra.get(NODE_NAME_EXTRA))
        .and_then(|values| values.first())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            Denial::BadToken(format!(
                "the token is not bound to a pod on a node (no {NODE_NAME_EXTRA} in it): \
                 use a projected service-account token"
            ))
        })?;
    Ok(node.clone())
}

/// Seconds since the epoch at which a JWT expires, read from its payload
/// unverified: only to bound how long a review is reused, after the API
/// server has verified the token.
pub fn token_expiry(token: &str) -> Option<u64> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64()
}

/// Recent TokenReview answers (the node each token proved), keyed by the
/// token's SHA-256 so no token is kept, each until min(its expiry, the TTL).
#[derive(Default)]
pub struct ReviewCache(Mutex<HashMap<[u8; 32], (String, Instant)>>);

impl ReviewCache {
    fn key(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    pub fn get(&self, token: &str) -> Option<String> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (node, until) = map.get(&Self::key(token))?;
        (Instant::now() < *until).then(|| node.clone())
    }

    /// Remembers that `token` proved `node`, until the token expires or
    /// `ttl` passes; a token without a readable expiry is not remembered.
    pub fn put(&self, token: &str, node: &str, ttl: Duration) {
        let Some(exp) = token_expiry(token) else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let left = Duration::from_secs(exp.saturating_sub(now)).min(ttl);
        if left.is_zero() {
            return;
        }
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= REVIEW_CACHE_CAPACITY {
            let now = Instant::now();
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= REVIEW_CACHE_CAPACITY {
                // Full of live entries (a flood of valid tokens): start over
                // rather than grow; the cost is TokenReviews, not safety.
                map.clear();
            }
        }
        map.insert(Self::key(token), (node.to_string(), Instant::now() + left));
    }
}

/// The Kubernetes authorizer: TokenReview for identity, the caches for the
/// decision.
pub struct KubeAuthorizer {
    client: kube::Client,
    settings: Settings,
    view: ClusterView,
    reviews: ReviewCache,
}

impl KubeAuthorizer {
    /// Starts the watch loops of both caches on the current runtime and
    /// returns at once: until they have listed, requests are answered
    /// UNAVAILABLE.
    pub fn start(client: kube::Client, settings: Settings) -> KubeAuthorizer {
        let (view, writers) = ClusterView::new();
        // Rounds of a third of the bound: a quiet cluster shows life well
        // within it, one lost round does not make the cache stale.
        let round = (settings.max_staleness / 3).max(Duration::from_secs(1));
        tokio::spawn(keep_synced(
            Api::<VolumeAttachment>::all(client.clone()),
            writers.attachments,
            writers.attachments_live,
            round,
        ));
        tokio::spawn(keep_synced(
            Api::<PersistentVolume>::all(client.clone()),
            writers.volumes,
            writers.volumes_live,
            round,
        ));
        KubeAuthorizer {
            client,
            settings,
            view,
            reviews: ReviewCache::default(),
        }
    }

    /// The node `token` proves the caller to be: from the cache, else from a
    /// TokenReview.
    async fn node_of(&self, token: &str) -> Result<String, Denial> {
        if let Some(node) = self.reviews.get(token) {
            return Ok(node);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.settings.audience.clone()]),
            },
            ..Default::default()
        };
        let api = Api::<TokenReview>::all(self.client.clone());
        let answer =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| Denial::Unavailable("TokenReview timed out".to_string()))?
                .map_err(|e| Denial::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        let node = node_of_review(
            &status,
            &self.settings.audience,
            &self.settings.node_account,
        )?;
        self.reviews.put(token, &node, REVIEW_CACHE_TTL);
        Ok(node)
    }
}

#[tonic::async_trait]
impl Authorizer for KubeAuthorizer {
    async fn authorize(&self, token: Option<&str>, volume_id: &str) -> Result<Grant, Denial> {
        let token = token.ok_or(Denial::NoToken)?;
        let node = self.node_of(token).await?;
        self.view.check_fresh(self.settings.max_staleness)?;
        let scope = self.view.decide(&self.settings.driver, &node, volume_id)?;
        Ok(Grant { node, scope })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use k8s_openapi::api::core::v1::{CSIPersistentVolumeSource, PersistentVolumeSpec};
    use k8s_openapi::api::storage::v1::{
        VolumeAttachmentSource, VolumeAttachmentSpec, VolumeAttachmentStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    const DRIVER: &str = "cryptdisk.csi.io";

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            resource_version: Some("1".to_string()),
            ..Default::default()
        }
    }

    fn pv(name: &str, driver: &str, handle: &str, scope: Option<&str>) -> PersistentVolume {
        PersistentVolume {
            metadata: meta(name),
            spec: Some(PersistentVolumeSpec {
                csi: Some(CSIPersistentVolumeSource {
                    driver: driver.to_string(),
                    volume_handle: handle.to_string(),
                    volume_attributes: scope
                        .map(|s| BTreeMap::from([(SCOPE_ATTRIBUTE.to_string(), s.to_string())])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn va(name: &str, attacher: &str, node: &str, pv: &str, attached: bool) -> VolumeAttachment {
        VolumeAttachment {
            metadata: meta(name),
            spec: VolumeAttachmentSpec {
                attacher: attacher.to_string(),
                node_name: node.to_string(),
                source: VolumeAttachmentSource {
                    persistent_volume_name: Some(pv.to_string()),
                    ..Default::default()
                },
            },
            status: Some(VolumeAttachmentStatus {
                attached,
                ..Default::default()
            }),
        }
    }

    /// A view filled by hand, both caches synced now.
    fn view(pvs: Vec<PersistentVolume>, vas: Vec<VolumeAttachment>) -> ClusterView {
        let (view, mut w) = ClusterView::new();
        for p in pvs {
            w.volumes.apply_watcher_event(&watcher::Event::Apply(p));
        }
        for a in vas {
            w.attachments.apply_watcher_event(&watcher::Event::Apply(a));
        }
        w.attachments_live.touch();
        w.volumes_live.touch();
        view
    }

    fn denied_not_attached(r: Result<String, Denial>) -> bool {
        matches!(r, Err(Denial::NotAttached { .. }))
    }

    #[test]
    fn attached_volume_is_granted_to_its_node_only() {
        let v = view(
            vec![pv("pv-1", DRIVER, "vol-1", None)],
            vec![va("va-1", DRIVER, "node-a", "pv-1", true)],
        );
        assert_eq!(v.decide(DRIVER, "node-a", "vol-1").unwrap(), "vol-1");
        assert!(denied_not_attached(v.decide(DRIVER, "node-b", "vol-1")));
        assert!(denied_not_attached(v.decide(DRIVER, "node-a", "vol-2")));
        // The PV's name is not its handle.
        assert!(denied_not_attached(v.decide(DRIVER, "node-a", "pv-1")));
    }

    #[test]
    fn every_condition_of_the_attachment_is_required() {
        let cases = [
            // Not attached (yet, or any more).
            (
                vec![pv("pv-1", DRIVER, "vol-1", None)],
                va("va", DRIVER, "node-a", "pv-1", false),
            ),
            // Another driver's attachment of our PV.
            (
                vec![pv("pv-1", DRIVER, "vol-1", None)],
                va("va", "other.csi.io", "node-a", "pv-1", true),
            ),
            // Our attachment of a PV of another driver with the same handle.
            (
                vec![pv("pv-1", "other.csi.io", "vol-1", None)],
                va("va", DRIVER, "node-a", "pv-1", true),
            ),
            // The attachment names a PV that does not exist.
            (
                vec![pv("pv-1", DRIVER, "vol-1", None)],
                va("va", DRIVER, "node-a", "pv-2", true),
            ),
        ];
        for (i, (pvs, a)) in cases.into_iter().enumerate() {
            let v = view(pvs, vec![a]);
            assert!(
                denied_not_attached(v.decide(DRIVER, "node-a", "vol-1")),
                "case {i}"
            );
        }
        // Without a status at all.
        let mut a = va("va", DRIVER, "node-a", "pv-1", true);
        a.status = None;
        let v = view(vec![pv("pv-1", DRIVER, "vol-1", None)], vec![a]);
        assert!(denied_not_attached(v.decide(DRIVER, "node-a", "vol-1")));
    }

    #[test]
    fn scope_comes_from_the_pv_and_a_restore_inherits_its_source() {
        let v = view(
            vec![
                pv("pv-src", DRIVER, "vol-src", Some("vol-src")),
                pv("pv-restored", DRIVER, "vol-restored", Some("vol-src")),
            ],
            vec![
                va("va-1", DRIVER, "node-a", "pv-src", true),
                va("va-2", DRIVER, "node-b", "pv-restored", true),
            ],
        );
        assert_eq!(
            v.decide(DRIVER, "node-b", "vol-restored").unwrap(),
            "vol-src"
        );
        assert_eq!(v.decide(DRIVER, "node-a", "vol-src").unwrap(), "vol-src");
        // The restore's node cannot have the source volume itself.
        assert!(denied_not_attached(v.decide(DRIVER, "node-b", "vol-src")));
    }

    #[test]
    fn conflicting_scopes_for_one_handle_fail_closed() {
        let v = view(
            vec![
                pv("pv-1", DRIVER, "vol-1", Some("scope-a")),
                pv("pv-2", DRIVER, "vol-1", Some("scope-b")),
            ],
            vec![
                va("va-1", DRIVER, "node-a", "pv-1", true),
                va("va-2", DRIVER, "node-a", "pv-2", true),
            ],
        );
        assert!(matches!(
            v.decide(DRIVER, "node-a", "vol-1"),
            Err(Denial::Unavailable(_))
        ));
    }

    #[test]
    fn a_detach_or_delete_revokes_at_once() {
        let (view, mut w) = ClusterView::new();
        w.volumes
            .apply_watcher_event(&watcher::Event::Apply(pv("pv-1", DRIVER, "vol-1", None)));
        let attached = va("va-1", DRIVER, "node-a", "pv-1", true);
        w.attachments
            .apply_watcher_event(&watcher::Event::Apply(attached.clone()));
        assert!(view.decide(DRIVER, "node-a", "vol-1").is_ok());
        w.attachments.apply_watcher_event(&watcher::Event::Apply(va(
            "va-1", DRIVER, "node-a", "pv-1", false,
        )));
        assert!(denied_not_attached(view.decide(DRIVER, "node-a", "vol-1")));
        w.attachments
            .apply_watcher_event(&watcher::Event::Apply(attached.clone()));
        assert!(view.decide(DRIVER, "node-a", "vol-1").is_ok());
        w.attachments
            .apply_watcher_event(&watcher::Event::Delete(attached));
        assert!(denied_not_attached(view.decide(DRIVER, "node-a", "vol-1")));
    }

    #[test]
    fn unsynced_or_stale_caches_fail_closed() {
        let (view, w) = ClusterView::new();
        let bound = Duration::from_millis(200);
        assert!(
            matches!(view.check_fresh(bound), Err(Denial::Unavailable(m)) if m.contains("not synced"))
        );
        w.attachments_live.touch();
        // One cache synced is not enough.
        assert!(
            matches!(view.check_fresh(bound), Err(Denial::Unavailable(m)) if m.contains("PersistentVolumes"))
        );
        w.volumes_live.touch();
        assert!(view.check_fresh(bound).is_ok());
        std::thread::sleep(bound + Duration::from_millis(50));
        assert!(
            matches!(view.check_fresh(bound), Err(Denial::Unavailable(m)) if m.contains("ago"))
        );
        w.attachments_live.touch();
        w.volumes_live.touch();
        assert!(view.check_fresh(bound).is_ok());
    }

    fn account() -> NodeAccount {
        "kube-system/cryptdisk-node".parse().unwrap()
    }

    fn review(
        authenticated: bool,
        user: &str,
        audiences: &[&str],
        node: Option<&str>,
    ) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.to_string()),
                extra: node
                    .map(|n| BTreeMap::from([(NODE_NAME_EXTRA.to_string(), vec![n.to_string()])])),
                ..Default::default()
            }),
            error: (!authenticated).then(|| "token has expired".to_string()),
        }
    }

    #[test]
    fn token_reviews_are_checked_for_account_audience_and_node() {
        let sa = "system:serviceaccount:kube-system:cryptdisk-node";
        let aud = "cryptdisk-kms";
        assert_eq!(
            node_of_review(&review(true, sa, &[aud], Some("node-a")), aud, &account()).unwrap(),
            "node-a"
        );
        assert!(matches!(
            node_of_review(&review(false, sa, &[aud], Some("node-a")), aud, &account()),
            Err(Denial::BadToken(m)) if m.contains("expired")
        ));
        assert!(matches!(
            node_of_review(
                &review(
                    true,
                    sa,
                    &["https://kubernetes.default.svc"],
                    Some("node-a")
                ),
                aud,
                &account()
            ),
            Err(Denial::BadToken(_))
        ));
        for other in [
            "system:serviceaccount:default:cryptdisk-node",
            "system:serviceaccount:kube-system:other",
            "system:node:node-a",
            "admin",
        ] {
            assert!(matches!(
                node_of_review(&review(true, other, &[aud], Some("node-a")), aud, &account()),
                Err(Denial::WrongAccount(u)) if u == other
            ));
        }
        assert!(matches!(
            node_of_review(&review(true, sa, &[aud], None), aud, &account()),
            Err(Denial::BadToken(m)) if m.contains(NODE_NAME_EXTRA)
        ));
        assert!(matches!(
            node_of_review(&review(true, sa, &[aud], Some("")), aud, &account()),
            Err(Denial::BadToken(_))
        ));
    }

    #[test]
    fn node_accounts_parse_as_namespace_slash_name() {
        assert_eq!(
            account().username(),
            "system:serviceaccount:kube-system:cryptdisk-node"
        );
        for bad in ["", "a", "/b", "a/", "a/b/c"] {
            assert!(bad.parse::<NodeAccount>().is_err(), "{bad:?}");
        }
    }

    fn jwt(exp: u64) -> String {
        use base64::Engine as _;
        let enc = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.c2ln",
            enc(serde_json::json!({"alg": "ES256"})),
            enc(serde_json::json!({"exp": exp, "sub": "x"}))
        )
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn review_cache_keeps_answers_until_expiry_or_ttl() {
        let cache = ReviewCache::default();
        let live = jwt(now() + 600);
        cache.put(&live, "node-a", Duration::from_secs(60));
        assert_eq!(cache.get(&live).as_deref(), Some("node-a"));
        assert_eq!(cache.get(&jwt(now() + 601)), None);
        // The TTL bounds it.
        let short = jwt(now() + 600);
        let cache = ReviewCache::default();
        cache.put(&short, "node-a", Duration::from_millis(100));
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(cache.get(&short), None);
        // An expired token, or one without a readable expiry, is not kept.
        cache.put(&jwt(now() - 1), "node-a", Duration::from_secs(60));
        assert_eq!(cache.get(&jwt(now() - 1)), None);
        cache.put("opaque", "node-a", Duration::from_secs(60));
        assert_eq!(cache.get("opaque"), None);
        assert_eq!(token_expiry(&jwt(1234)), Some(1234));
    }

    #[test]
    fn review_cache_stays_bounded() {
        let cache = ReviewCache::default();
        let exp = now() + 600;
        for i in 0..REVIEW_CACHE_CAPACITY + 10 {
            cache.put(&format!("{}{i}", jwt(exp)), "n", Duration::from_secs(60));
        }
        assert!(cache.0.lock().unwrap().len() <= REVIEW_CACHE_CAPACITY);
    }
}
