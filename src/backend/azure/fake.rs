//! An in-process fake of the ARM endpoints the backend uses, of Entra ID's
//! token endpoint for the client-secret flow, and of the Instance Metadata
//! Service's `GET /metadata/instance` as one of its VMs sees it.
//!
//! It checks what the real services document: the api-version of each resource
//! type, the bearer token, request body shapes (disk, snapshot and VM data-disk
//! fields, SKU size limits, caching a SKU allows, LUN conflicts), and answers
//! as ARM does: 202 with `Azure-AsyncOperation`/`Location` for long-running
//! operations, polled until they succeed; one VM update at a time (409
//! otherwise); `nextLink` pages; 429 with `Retry-After` when told to throttle;
//! `{"error":{"code","message"}}` bodies. A request shape it does not expect is
//! recorded in `problems`, which the tests assert empty.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use azure_core::http::{AsyncRawResponse, HttpClient, Request};
use serde_json::{Value, json};

use super::auth::ReqwestTransport;
use super::disks::{GIB, Sku, TAG_CREATED_BY, TAG_NAME};
use super::imds::max_data_disks;
use crate::test_http::{Answer, pairs, serve};

/// The documented api-versions the fake serves, written out rather than taken
/// from the client's constants so that a wrong constant fails the tests.
const DISKS_API_VERSION: &str = "2024-03-02";
const VM_API_VERSION: &str = "2024-07-01";
const IMDS_INSTANCE_API_VERSION: &str = "2021-02-01";

pub const SUB: &str = "sub-1";
pub const RG: &str = "rg-1";
pub const LOCATION: &str = "eastus";
pub const TENANT: &str = "tenant-1";
pub const CLIENT_ID: &str = "app-1";
pub const CLIENT_SECRET: &str = "s3cret-value";
pub const TOKEN: &str = "tok-arm-1";
/// The projected service account token workload identity exchanges.
pub const FEDERATED_TOKEN: &str = "eyJ.federated.token";
/// The authority host azure_identity is configured with in tests (it insists
/// on https); [`RedirectTransport`] sends its requests to the fake instead.
pub const FAKE_AUTHORITY: &str = "https://login.fake.test";

/// A request as the fake saw it.
pub use crate::test_http::Exchange as Seen;

pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

fn reply(status: u16, body: Value) -> Reply {
    Reply {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: if body.is_null() {
            String::new()
        } else {
            body.to_string()
        },
    }
}

pub fn arm_error(status: u16, code: &str, message: &str) -> Reply {
    reply(status, json!({"error": {"code": code, "message": message}}))
}

/// What finishes when an operation's last poll answers.
enum Finish {
    Provisioned { snapshot: bool, key: String },
    VmUpdated { key: String },
    Nothing,
}

struct Operation {
    polls_left: u32,
    finish: Finish,
    fail: Option<(String, String)>,
}

/// A one-shot error answer for the next request matching method and path part.
pub struct Injection {
    pub method: &'static str,
    pub path_contains: String,
    pub status: u16,
    pub code: String,
    pub message: String,
}

#[derive(Default)]
pub struct State {
    pub disks: BTreeMap<String, Value>,
    pub snapshots: BTreeMap<String, Value>,
    pub vms: BTreeMap<String, Value>,
    /// VMs with an update in progress.
    busy: BTreeMap<String, bool>,
    ops: HashMap<String, Operation>,
    next_op: u64,
    /// Every request, in order.
    pub requests: Vec<Seen>,
    /// Requests answered 429 before the next ones go through.
    pub throttle: u32,
    /// Writes (PUT, PATCH, DELETE, POST) answered 429 before the next ones go
    /// through; reads are not affected, as ARM counts a subscription's reads
    /// and writes apart (`x-ms-ratelimit-remaining-subscription-reads` and
    /// `-writes`).
    pub throttle_writes: u32,
    /// The `Retry-After` (seconds) of a 429.
    pub retry_after_secs: u64,
    /// Requests answered 503 before the next ones go through.
    pub unavailable: u32,
    pub injections: Vec<Injection>,
    /// The next long-running operation ends `Failed` with this code and message.
    pub fail_next_operation: Option<(String, String)>,
    /// Polls an operation answers InProgress before it finishes.
    pub polls: u32,
    /// Items per page of a list.
    pub page_size: usize,
    pub token_requests: u32,
    /// The VM (by name) whose instance metadata `GET /metadata/instance`
    /// answers; `None` answers 404 as IMDS does off Azure.
    pub imds_vm: Option<String>,
    /// Disks (by lower-case ARM id) whose detach does not complete unless
    /// forced: the update succeeds but the VM still lists them (with
    /// `toBeDetached`), as a detach stuck in the guest looks; the reference
    /// (cloud-provider-azure) then detaches again with `ForceDetach`.
    pub stuck_detach: std::collections::BTreeSet<String>,
    /// Another writer of a VM's disk list: right after the next GET of the VM
    /// (lower-case path), disk `.1` (lower-case ARM id) is attached to it at
    /// LUN `.2`, changing its etag.
    pub foreign_attach: Option<(String, String, u64)>,
    /// Request shapes the real service would refuse or that we did not expect.
    pub problems: Vec<String>,
}

pub struct FakeArm {
    pub base: String,
    pub state: Arc<Mutex<State>>,
}

impl FakeArm {
    pub async fn start() -> FakeArm {
        let state = Arc::new(Mutex::new(State {
            polls: 1,
            page_size: 2,
            retry_after_secs: 1,
            ..Default::default()
        }));
        let st = state.clone();
        let base = serve(|base: &str| {
            let base = base.to_string();
            move |seen: Seen| {
                let r = {
                    let mut s = st.lock().unwrap();
                    s.requests.push(seen.clone());
                    handle(&mut s, &base, &seen)
                };
                Answer {
                    status: r.status,
                    headers: r.headers,
                    body: r.body.into_bytes(),
                }
            }
        })
        .await;
        FakeArm { base, state }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Adds a VM of `size` with no data disks.
    pub fn add_vm(&self, name: &str, size: &str) {
        let id = format!(
            "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines/{name}"
        );
        self.with(|s| {
            s.vms.insert(
                id.to_ascii_lowercase(),
                json!({
                    "id": id, "name": name, "location": LOCATION, "etag": "\"1\"",
                    "type": "Microsoft.Compute/virtualMachines",
                    "properties": {
                        "hardwareProfile": {"vmSize": size},
                        "storageProfile": {"dataDisks": []},
                        "provisioningState": "Succeeded",
                    }
                }),
            );
        });
    }

    /// Adds instance `instance_id` of the Uniform scale set `scale_set`, of
    /// `size`, with no data disks. As ARM shows a scale-set VM
    /// (Compute 2024-07-01, virtualMachineScaleSetVM.json): its id is under
    /// `virtualMachineScaleSets/{ss}/virtualMachines/{instance id}`, its `name`
    /// is `<ss>_<instance id>` (also what IMDS calls it), and it has an
    /// `instanceId`.
    pub fn add_scale_set_vm(&self, scale_set: &str, instance_id: &str, size: &str) {
        let id = format!(
            "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/{scale_set}/virtualMachines/{instance_id}"
        );
        self.with(|s| {
            s.vms.insert(
                id.to_ascii_lowercase(),
                json!({
                    "id": id, "name": format!("{scale_set}_{instance_id}"),
                    "instanceId": instance_id, "location": LOCATION, "etag": "\"1\"",
                    "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
                    "properties": {
                        "hardwareProfile": {"vmSize": size},
                        "storageProfile": {"dataDisks": []},
                        "provisioningState": "Succeeded",
                    }
                }),
            );
        });
    }

    pub fn inject(
        &self,
        method: &'static str,
        path_contains: &str,
        status: u16,
        code: &str,
        message: &str,
    ) {
        self.with(|s| {
            s.injections.push(Injection {
                method,
                path_contains: path_contains.to_ascii_lowercase(),
                status,
                code: code.into(),
                message: message.into(),
            })
        });
    }

    pub fn problems(&self) -> Vec<String> {
        self.with(|s| s.problems.clone())
    }

    /// Requests seen as `METHOD path` (lower-case path), after `from`.
    pub fn calls_since(&self, from: usize) -> Vec<String> {
        self.with(|s| {
            s.requests[from..]
                .iter()
                .map(|r| format!("{} {}", r.method, r.path.to_ascii_lowercase()))
                .collect()
        })
    }

    pub fn request_count(&self) -> usize {
        self.with(|s| s.requests.len())
    }
}

/// The transport azure_identity uses in tests: what goes to [`FAKE_AUTHORITY`]
/// goes to the fake, over plain HTTP.
#[derive(Debug)]
pub struct RedirectTransport {
    pub inner: ReqwestTransport,
    pub to: String,
}

#[async_trait::async_trait]
impl HttpClient for RedirectTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let mut req = request.clone();
        let url = req.url().as_str().replacen(FAKE_AUTHORITY, &self.to, 1);
        *req.url_mut() = url.parse().expect("a URL");
        self.inner.execute_request(&req).await
    }
}

fn handle(s: &mut State, base: &str, r: &Seen) -> Reply {
    let path = r.path.to_ascii_lowercase();
    // IMDS takes no token: it is reached only from inside the VM.
    if r.path == "/metadata/instance" {
        return imds_instance(s, r);
    }
    if path == format!("/{TENANT}/oauth2/v2.0/token") {
        return token(s, r);
    }
    if r.header("authorization") != format!("Bearer {TOKEN}") {
        return arm_error(
            401,
            "InvalidAuthenticationToken",
            "The access token is invalid.",
        );
    }
    let write = r.method != "GET";
    if s.throttle > 0 || (write && s.throttle_writes > 0) {
        if s.throttle > 0 {
            s.throttle -= 1;
        } else {
            s.throttle_writes -= 1;
        }
        let mut rep = arm_error(429, "TooManyRequests", "The request is being throttled.");
        rep.headers
            .push(("retry-after".into(), s.retry_after_secs.to_string()));
        return rep;
    }
    if s.unavailable > 0 {
        s.unavailable -= 1;
        return arm_error(
            503,
            "ServiceUnavailable",
            "The service is temporarily unavailable.",
        );
    }
    if let Some(i) = s
        .injections
        .iter()
        .position(|i| i.method == r.method && path.contains(&i.path_contains))
    {
        let i = s.injections.remove(i);
        return arm_error(i.status, &i.code, &i.message);
    }
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let api = r.query.get("api-version").map(String::as_str).unwrap_or("");
    let want_api = |want: &str| -> Option<Reply> {
        (api != want).then(|| {
            arm_error(
                400,
                "InvalidApiVersionParameter",
                &format!("The api-version '{api}' is invalid; this fake serves '{want}'."),
            )
        })
    };
    match segs.as_slice() {
        [
            "subscriptions",
            sub,
            "providers",
            "microsoft.compute",
            "locations",
            _,
            kind,
            id,
        ] if *sub == SUB.to_ascii_lowercase() && r.method == "GET" => poll(s, kind, id),
        [
            "subscriptions",
            sub,
            "resourcegroups",
            rg,
            "providers",
            "microsoft.compute",
            kind,
            rest @ ..,
        ] if *sub == SUB.to_ascii_lowercase() => {
            let collection_path = format!(
                "/subscriptions/{sub}/resourcegroups/{rg}/providers/microsoft.compute/{kind}"
            );
            match (*kind, rest) {
                ("disks" | "snapshots", _) => {
                    if let Some(bad) = want_api(DISKS_API_VERSION) {
                        s.problems
                            .push(format!("{} {path}: api-version {api:?}", r.method));
                        return bad;
                    }
                }
                ("virtualmachines" | "virtualmachinescalesets", _) => {
                    if let Some(bad) = want_api(VM_API_VERSION) {
                        s.problems
                            .push(format!("{} {path}: api-version {api:?}", r.method));
                        return bad;
                    }
                }
                _ => {}
            }
            match (*kind, rest, r.method.as_str()) {
                ("disks", [], "GET") => list(s, base, &collection_path, r, false),
                ("snapshots", [], "GET") => list(s, base, &collection_path, r, true),
                ("disks", [_], "GET") => get(&s.disks, &path, "disk"),
                ("snapshots", [_], "GET") => get(&s.snapshots, &path, "snapshot"),
                ("virtualmachines", [_], "GET") => get_vm(s, &path),
                ("disks", [name], "PUT") => put_disk(s, base, &r.path, name, r),
                ("disks", [_], "PATCH") => patch_disk(s, base, &path, r),
                ("disks", [_], "DELETE") => delete(s, base, &path, false),
                ("snapshots", [name], "PUT") => put_snapshot(s, base, &r.path, name, r),
                ("snapshots", [_], "DELETE") => delete(s, base, &path, true),
                ("virtualmachines", [_], "PATCH") => update_vm(s, base, &path, r, false),
                // Compute 2024-07-01, virtualMachineScaleSetVM.json: a
                // scale-set VM is read with GET and updated with PUT
                // (VirtualMachineScaleSetVMs_Update); there is no PATCH.
                ("virtualmachinescalesets", [_, "virtualmachines", _], "GET") => get_vm(s, &path),
                ("virtualmachinescalesets", [_, "virtualmachines", _], "PUT") => {
                    update_vm(s, base, &path, r, true)
                }
                _ => {
                    s.problems.push(format!("no route {} {path}", r.method));
                    arm_error(
                        404,
                        "NoRegisteredProviderFound",
                        "no such route in the fake",
                    )
                }
            }
        }
        _ => {
            s.problems.push(format!("no route {} {path}", r.method));
            arm_error(404, "NotFound", "no such route in the fake")
        }
    }
}

/// IMDS `GET /metadata/instance?api-version=2021-02-01` (header
/// `Metadata: true`), in the shape that api-version documents for the parts the
/// driver reads: `compute.name`, `vmSize`, `zone`, `location`,
/// `resourceGroupName`, `subscriptionId`, and `storageProfile.dataDisks[]`
/// with `lun` as a string, `name`, `managedDisk.id` (the ARM id) and
/// `managedDisk.storageAccountType`, `caching`, `createOption`, `diskSizeGB`
/// (a string), `image`/`vhd` (`uri`, empty for managed disks) and
/// `writeAcceleratorEnabled` (a string). The data disks are the VM's
/// attachments in the fake ARM, so what the controller attached is what the
/// node sees.
fn imds_instance(s: &mut State, r: &Seen) -> Reply {
    if r.method != "GET"
        || r.header("metadata") != "true"
        || r.query.get("api-version").map(String::as_str) != Some(IMDS_INSTANCE_API_VERSION)
    {
        s.problems.push(format!(
            "IMDS: {} {} {:?} metadata={:?}",
            r.method,
            r.path,
            r.query,
            r.header("metadata")
        ));
        return reply(400, json!({"error": "Bad request"}));
    }
    let Some(name) = s.imds_vm.clone() else {
        return reply(404, json!({"error": "Not found"}));
    };
    let Some(vm) = s
        .vms
        .values()
        .find(|v| v["name"].as_str() == Some(name.as_str()))
    else {
        return reply(404, json!({"error": "Not found"}));
    };
    let disks: Vec<Value> = vm
        .pointer("/properties/storageProfile/dataDisks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            let id = e.pointer("/managedDisk/id").and_then(Value::as_str);
            let disk = id.and_then(|id| s.disks.get(&id.to_ascii_lowercase()));
            let mut d = json!({
                "lun": e["lun"].as_u64().map(|l| l.to_string()).unwrap_or_default(),
                "name": e["name"].as_str().map(str::to_string).or_else(|| {
                    id.and_then(|i| i.rsplit('/').next()).map(str::to_string)
                }),
                "caching": e["caching"],
                "createOption": e["createOption"],
                "diskSizeGB": disk
                    .and_then(|d| d.pointer("/properties/diskSizeGB"))
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                "image": {"uri": ""},
                "vhd": {"uri": ""},
                "writeAcceleratorEnabled": "false",
            });
            if let Some(id) = id {
                d["managedDisk"] = json!({
                    "id": id,
                    "storageAccountType": disk
                        .and_then(|d| d.pointer("/sku/name"))
                        .cloned()
                        .unwrap_or(json!("")),
                });
            }
            d
        })
        .collect();
    reply(
        200,
        json!({"compute": {
            "name": vm["name"],
            "vmSize": vm.pointer("/properties/hardwareProfile/vmSize"),
            "location": vm["location"],
            "zone": "",
            "resourceGroupName": RG,
            "subscriptionId": SUB,
            "storageProfile": {"dataDisks": disks},
        }}),
    )
}

fn token(s: &mut State, r: &Seen) -> Reply {
    s.token_requests += 1;
    let form = pairs(&String::from_utf8_lossy(&r.body));
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    // Workload identity sends the federated token as a client assertion.
    let federated = form.contains_key("client_assertion");
    let problem = if r.method != "POST" {
        Some("not a POST")
    } else if get("grant_type") != "client_credentials" {
        Some("grant_type")
    } else if get("client_id") != CLIENT_ID {
        Some("client_id")
    } else if federated
        && get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    {
        Some("client_assertion_type")
    } else if federated && get("client_assertion") != FEDERATED_TOKEN {
        Some("client_assertion")
    } else if !federated && get("client_secret") != CLIENT_SECRET {
        Some("client_secret")
    } else if get("scope") != "https://management.azure.com/.default" {
        Some("scope")
    } else {
        None
    };
    match problem {
        Some(p) => {
            s.problems.push(format!("token request: bad {p}"));
            reply(
                401,
                json!({"error": "invalid_client", "error_description": format!("AADSTS7000215: bad {p}")}),
            )
        }
        None => reply(
            200,
            json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": TOKEN}),
        ),
    }
}

fn get(map: &BTreeMap<String, Value>, path: &str, what: &str) -> Reply {
    match map.get(path) {
        Some(v) => reply(200, v.clone()),
        None => arm_error(
            404,
            "ResourceNotFound",
            &format!(
                "The Resource '{what} {}' was not found.",
                path.rsplit('/').next().unwrap_or("")
            ),
        ),
    }
}

/// GET of a VM or scale-set VM; then [`State::foreign_attach`] happens.
fn get_vm(s: &mut State, path: &str) -> Reply {
    let rep = get(&s.vms, path, "virtual machine");
    if s.foreign_attach
        .as_ref()
        .is_some_and(|(vm, _, _)| vm == path)
    {
        let (_, disk, lun) = s.foreign_attach.take().expect("present");
        let vm = s.vms.get_mut(path).expect("a VM");
        let vm_id = vm["id"].clone();
        let entry = json!({"lun": lun, "createOption": "Attach", "caching": "None",
            "managedDisk": {"id": disk}, "toBeDetached": false});
        vm["properties"]["storageProfile"]["dataDisks"]
            .as_array_mut()
            .expect("a list")
            .push(entry);
        bump_etag(vm);
        if let Some(d) = s.disks.get_mut(&disk) {
            d["managedBy"] = vm_id;
            d["properties"]["diskState"] = json!("Attached");
        }
    }
    rep
}

/// A VM's etag changes with every change of the VM (Compute 2024-07-01:
/// "Etag is property returned in Create/Update/Get response of the VM").
fn bump_etag(vm: &mut Value) {
    let n: u64 = vm["etag"]
        .as_str()
        .and_then(|e| e.trim_matches('"').parse().ok())
        .unwrap_or(0);
    vm["etag"] = json!(format!("\"{}\"", n + 1));
}

fn list(s: &mut State, base: &str, collection: &str, r: &Seen, snapshots: bool) -> Reply {
    let map = if snapshots { &s.snapshots } else { &s.disks };
    let prefix = format!("{collection}/");
    let all: Vec<&Value> = map
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(_, v)| v)
        .collect();
    let skip: usize = r
        .query
        .get("$skiptoken")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let page: Vec<Value> = all
        .iter()
        .skip(skip)
        .take(s.page_size)
        .map(|v| (*v).clone())
        .collect();
    let mut body = json!({"value": page});
    if skip + s.page_size < all.len() {
        body["nextLink"] = json!(format!(
            "{base}{collection}?api-version={DISKS_API_VERSION}&$skiptoken={}",
            skip + s.page_size
        ));
    }
    reply(200, body)
}

/// Starts a long-running operation: 201/202 (or 200 for a VM update) with
/// `Azure-AsyncOperation` and, for deletes, `Location`.
fn start_op(
    s: &mut State,
    base: &str,
    status: u16,
    finish: Finish,
    body: Value,
    location_only: bool,
) -> Reply {
    s.next_op += 1;
    let id = format!("op-{}", s.next_op);
    s.ops.insert(
        id.clone(),
        Operation {
            polls_left: s.polls,
            finish,
            fail: s.fail_next_operation.take(),
        },
    );
    let mut rep = reply(status, body);
    let ops =
        format!("{base}/subscriptions/{SUB}/providers/Microsoft.Compute/locations/{LOCATION}");
    if !location_only {
        rep.headers.push((
            "azure-asyncoperation".into(),
            format!("{ops}/operations/{id}?api-version={DISKS_API_VERSION}"),
        ));
    }
    rep.headers.push((
        "location".into(),
        format!("{ops}/operationresults/{id}?api-version={DISKS_API_VERSION}"),
    ));
    rep.headers.push(("retry-after".into(), "0".into()));
    rep
}

fn poll(s: &mut State, kind: &str, id: &str) -> Reply {
    let Some(op) = s.ops.get_mut(id) else {
        return arm_error(404, "NotFound", "no such operation");
    };
    let location = kind == "operationresults";
    if op.polls_left > 0 {
        op.polls_left -= 1;
        let mut rep = if location {
            reply(202, Value::Null)
        } else {
            reply(200, json!({"name": id, "status": "InProgress"}))
        };
        rep.headers.push(("retry-after".into(), "0".into()));
        return rep;
    }
    let op = s.ops.remove(id).expect("present");
    finish(s, &op.finish, op.fail.is_some());
    match (op.fail, location) {
        (Some((code, message)), false) => reply(
            200,
            json!({"name": id, "status": "Failed", "error": {"code": code, "message": message}}),
        ),
        (Some((code, message)), true) => arm_error(400, &code, &message),
        (None, false) => reply(200, json!({"name": id, "status": "Succeeded"})),
        (None, true) => reply(204, Value::Null),
    }
}

fn finish(s: &mut State, f: &Finish, failed: bool) {
    let state = if failed { "Failed" } else { "Succeeded" };
    match f {
        Finish::Provisioned { snapshot, key } => {
            let map = if *snapshot {
                &mut s.snapshots
            } else {
                &mut s.disks
            };
            if let Some(r) = map.get_mut(key) {
                r["properties"]["provisioningState"] = json!(state);
                if *snapshot {
                    r["properties"]["completionPercent"] = json!(100.0);
                }
            }
        }
        Finish::VmUpdated { key } => {
            s.busy.remove(key);
            if let Some(vm) = s.vms.get_mut(key) {
                vm["properties"]["provisioningState"] = json!(state);
            }
        }
        Finish::Nothing => {}
    }
}

fn body_json(s: &mut State, r: &Seen) -> Option<Value> {
    if !r.header("content-type").starts_with("application/json") {
        s.problems
            .push(format!("{} {}: not JSON", r.method, r.path));
    }
    serde_json::from_slice(&r.body).ok()
}

fn source_size(s: &State, id: &str) -> Option<u64> {
    let key = id.to_ascii_lowercase();
    s.disks
        .get(&key)
        .or_else(|| s.snapshots.get(&key))
        .and_then(|v| v.pointer("/properties/diskSizeGB").and_then(Value::as_u64))
}

fn put_disk(s: &mut State, base: &str, raw_path: &str, name: &str, r: &Seen) -> Reply {
    let Some(body) = body_json(s, r) else {
        return arm_error(
            400,
            "InvalidRequestContent",
            "The request content was invalid.",
        );
    };
    let mut bad = |why: String| {
        s.problems.push(format!("PUT disk {name}: {why}"));
        arm_error(400, "InvalidParameter", &why)
    };
    if body["location"] != LOCATION {
        return bad(format!("location {} is not {LOCATION}", body["location"]));
    }
    let Some(sku) = body
        .pointer("/sku/name")
        .and_then(Value::as_str)
        .and_then(Sku::parse)
    else {
        return bad(format!("sku {} is not a disk SKU", body["sku"]));
    };
    for tag in [TAG_CREATED_BY, TAG_NAME] {
        if body
            .pointer(&format!("/tags/{tag}"))
            .and_then(Value::as_str)
            .is_none()
        {
            return bad(format!("tag {tag} missing"));
        }
    }
    if let Some(z) = body.get("zones") {
        let ok = z.as_array().is_some_and(|a| {
            a.len() == 1
                && a.iter()
                    .all(|v| matches!(v.as_str(), Some("1" | "2" | "3")))
        });
        if !ok {
            return bad(format!("zones {z} is not one of [\"1\"], [\"2\"], [\"3\"]"));
        }
    }
    // DiskRP 2024-03-02: zone-redundant SKUs take no zones; Premium SSD v2
    // and Ultra disks need one.
    if sku.is_zone_redundant() && body.get("zones").is_some() {
        return bad(format!("{} disks take no zones", sku.as_str()));
    }
    if sku.needs_zone() && body.get("zones").is_none() {
        return bad(format!("{} disks need a zone", sku.as_str()));
    }
    // DiskRP 2024-03-02 enums NetworkAccessPolicy and PublicNetworkAccess;
    // the driver's own rule: new disks are closed to the network.
    let props = &body["properties"];
    if props["networkAccessPolicy"] != "DenyAll" || props["publicNetworkAccess"] != "Disabled" {
        return bad(format!(
            "networkAccessPolicy {} / publicNetworkAccess {}: expected DenyAll / Disabled",
            props["networkAccessPolicy"], props["publicNetworkAccess"]
        ));
    }
    let perf = ["diskIOPSReadWrite", "diskMBpsReadWrite"];
    if !sku.is_performance_tier() && perf.iter().any(|k| body["properties"].get(k).is_some()) {
        return bad(format!(
            "IOPS and MBps apply to PremiumV2_LRS and UltraSSD_LRS, not {}",
            sku.as_str()
        ));
    }
    let Some(size) = body
        .pointer("/properties/diskSizeGB")
        .and_then(Value::as_u64)
    else {
        return bad("diskSizeGB missing or not a whole number".into());
    };
    let (min, max) = sku.size_limits_gib();
    if size < min || size > max {
        return bad(format!(
            "diskSizeGB {size} is outside {min}..={max} for {}",
            sku.as_str()
        ));
    }
    let creation = &body["properties"]["creationData"];
    match creation["createOption"].as_str() {
        Some("Empty") if creation.get("sourceResourceId").is_none() => {}
        Some("Copy") => {
            let src = creation["sourceResourceId"].as_str().unwrap_or("");
            match source_size(s, src) {
                None => {
                    return arm_error(
                        404,
                        "NotFound",
                        &format!("Source resource '{src}' was not found."),
                    );
                }
                // ARM copies a zonal disk only into its own zone (the
                // reference driver's clones stay in their source's zone).
                _ if s.disks.get(&src.to_ascii_lowercase()).is_some_and(|d| {
                    d.get("zones").is_some_and(|z| Some(z) != body.get("zones"))
                }) =>
                {
                    return arm_error(
                        400,
                        "InvalidParameter",
                        &format!(
                            "The source disk '{src}' is in zones {}; a copy must be in the same zone.",
                            s.disks[&src.to_ascii_lowercase()]["zones"]
                        ),
                    );
                }
                Some(src_size) if src_size > size => {
                    return arm_error(
                        400,
                        "BadRequest",
                        &format!(
                            "Disk size {size} GB cannot be smaller than the source's {src_size} GB."
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        other => {
            return bad(format!(
                "createOption {other:?} is not Empty or Copy (with sourceResourceId)"
            ));
        }
    }
    let key = raw_path.to_ascii_lowercase();
    let mut disk = body.clone();
    disk["id"] = json!(raw_path);
    disk["name"] = json!(name);
    disk["type"] = json!("Microsoft.Compute/disks");
    disk["properties"]["provisioningState"] = json!("Creating");
    disk["properties"]["diskState"] = json!("Unattached");
    disk["properties"]["diskSizeBytes"] = json!(size * GIB);
    disk["properties"]["timeCreated"] = json!("2026-11-29T20:00:00.0000000+00:00");
    s.disks.insert(key.clone(), disk.clone());
    start_op(
        s,
        base,
        202,
        Finish::Provisioned {
            snapshot: false,
            key,
        },
        disk,
        false,
    )
}

fn patch_disk(s: &mut State, base: &str, path: &str, r: &Seen) -> Reply {
    let Some(body) = body_json(s, r) else {
        return arm_error(
            400,
            "InvalidRequestContent",
            "The request content was invalid.",
        );
    };
    let Some(disk) = s.disks.get(path).cloned() else {
        return get(&s.disks, path, "disk");
    };
    // DiskUpdate: either the size or the tags (which replace the whole set).
    if let Some(tags) = body.get("tags") {
        let strings = tags
            .as_object()
            .is_some_and(|t| t.values().all(Value::is_string));
        if !strings || body.as_object().is_some_and(|o| o.len() != 1) {
            s.problems
                .push(format!("PATCH disk: unexpected fields {body}"));
            return arm_error(400, "InvalidParameter", "tags must map names to strings");
        }
        // The driver sends the whole set back (a PATCH replaces it): its own
        // tags must survive any change of another.
        for tag in [TAG_CREATED_BY, TAG_NAME] {
            if tags.get(tag).is_none() {
                s.problems.push(format!(
                    "PATCH disk tags: the driver's tag {tag} was dropped"
                ));
            }
        }
        let d = s.disks.get_mut(path).unwrap();
        d["tags"] = tags.clone();
        d["properties"]["provisioningState"] = json!("Updating");
        let out = d.clone();
        return start_op(
            s,
            base,
            202,
            Finish::Provisioned {
                snapshot: false,
                key: path.to_string(),
            },
            out,
            false,
        );
    }
    let props = body["properties"].as_object().cloned().unwrap_or_default();
    if props.keys().any(|k| k != "diskSizeGB") || body.as_object().is_some_and(|o| o.len() != 1) {
        s.problems
            .push(format!("PATCH disk: unexpected fields {body}"));
    }
    let Some(size) = body
        .pointer("/properties/diskSizeGB")
        .and_then(Value::as_u64)
    else {
        return arm_error(400, "InvalidParameter", "diskSizeGB missing");
    };
    let current = disk["properties"]["diskSizeGB"].as_u64().unwrap_or(0);
    if size < current {
        return arm_error(400, "BadRequest", "Disk size reduction is not supported.");
    }
    let sku = disk
        .pointer("/sku/name")
        .and_then(Value::as_str)
        .and_then(Sku::parse)
        .unwrap();
    if size > sku.size_limits_gib().1 {
        return arm_error(
            400,
            "InvalidParameter",
            "diskSizeGB above the SKU's maximum",
        );
    }
    if disk.get("managedBy").is_some() && !sku.grows_online(current, size) {
        return arm_error(
            409,
            "OperationNotAllowed",
            "Cannot resize disk past 4 TiB while it is attached to a running VM.",
        );
    }
    let d = s.disks.get_mut(path).unwrap();
    d["properties"]["diskSizeGB"] = json!(size);
    d["properties"]["diskSizeBytes"] = json!(size * GIB);
    d["properties"]["provisioningState"] = json!("Updating");
    let out = d.clone();
    start_op(
        s,
        base,
        202,
        Finish::Provisioned {
            snapshot: false,
            key: path.to_string(),
        },
        out,
        false,
    )
}

fn delete(s: &mut State, base: &str, path: &str, snapshot: bool) -> Reply {
    let map = if snapshot {
        &mut s.snapshots
    } else {
        &mut s.disks
    };
    let Some(existing) = map.get(path) else {
        return reply(204, Value::Null);
    };
    if let Some(vm) = existing.get("managedBy").and_then(Value::as_str) {
        return arm_error(
            409,
            "OperationNotAllowed",
            &format!(
                "Disk {} is attached to VM {vm}.",
                path.rsplit('/').next().unwrap_or("")
            ),
        );
    }
    map.remove(path);
    start_op(s, base, 202, Finish::Nothing, Value::Null, true)
}

fn put_snapshot(s: &mut State, base: &str, raw_path: &str, name: &str, r: &Seen) -> Reply {
    let Some(body) = body_json(s, r) else {
        return arm_error(
            400,
            "InvalidRequestContent",
            "The request content was invalid.",
        );
    };
    if body["location"] != LOCATION {
        s.problems.push(format!(
            "PUT snapshot {name}: location {}",
            body["location"]
        ));
    }
    if body.pointer("/properties/incremental") != Some(&json!(true)) {
        s.problems
            .push(format!("PUT snapshot {name}: not incremental"));
    }
    let creation = &body["properties"]["creationData"];
    if creation["createOption"] != "Copy" {
        s.problems.push(format!(
            "PUT snapshot {name}: createOption {}",
            creation["createOption"]
        ));
        return arm_error(400, "InvalidParameter", "createOption must be Copy");
    }
    let src = creation["sourceResourceId"]
        .as_str()
        .unwrap_or("")
        .to_ascii_lowercase();
    let Some(source) = s.disks.get(&src).cloned() else {
        return arm_error(
            404,
            "NotFound",
            &format!("Source disk '{src}' was not found."),
        );
    };
    let key = raw_path.to_ascii_lowercase();
    let mut snap = body.clone();
    snap["id"] = json!(raw_path);
    snap["name"] = json!(name);
    snap["type"] = json!("Microsoft.Compute/snapshots");
    snap["properties"]["diskSizeGB"] = source["properties"]["diskSizeGB"].clone();
    snap["properties"]["provisioningState"] = json!("Creating");
    snap["properties"]["completionPercent"] = json!(0.0);
    snap["properties"]["timeCreated"] = json!("2026-11-29T20:01:02.5+00:00");
    s.snapshots.insert(key.clone(), snap.clone());
    start_op(
        s,
        base,
        202,
        Finish::Provisioned {
            snapshot: true,
            key,
        },
        snap,
        false,
    )
}

/// `PATCH` of a VM (VirtualMachines_Update) or `PUT` of a scale-set VM
/// (VirtualMachineScaleSetVMs_Update, whose body is a whole resource with its
/// required `location`): the data-disk list replaces the VM's.
fn update_vm(s: &mut State, base: &str, path: &str, r: &Seen, put: bool) -> Reply {
    let Some(body) = body_json(s, r) else {
        return arm_error(
            400,
            "InvalidRequestContent",
            "The request content was invalid.",
        );
    };
    let Some(vm) = s.vms.get(path).cloned() else {
        return get(&s.vms, path, "virtual machine");
    };
    if put && body["location"] != LOCATION {
        s.problems
            .push(format!("PUT scale-set VM: location {}", body["location"]));
        return arm_error(400, "InvalidParameter", "location is required");
    }
    if s.busy.contains_key(path) {
        return arm_error(
            409,
            "Conflict",
            "Operation 'Update VM' is not allowed since another operation is in progress on it.",
        );
    }
    // Compute 2024-07-01 (VirtualMachines_Update, VirtualMachineScaleSetVMs_Update):
    // `If-Match` with an etag that is no longer the VM's is refused with 412.
    let if_match = r.header("if-match");
    if !if_match.is_empty() && if_match != "*" && Some(if_match) != vm["etag"].as_str() {
        return arm_error(
            412,
            "PreconditionFailed",
            "The specified precondition 'If-Match' failed: the resource has changed.",
        );
    }
    let Some(entries) = body
        .pointer("/properties/storageProfile/dataDisks")
        .and_then(Value::as_array)
    else {
        s.problems.push(format!("PATCH VM: no dataDisks in {body}"));
        return arm_error(400, "InvalidParameter", "no dataDisks");
    };
    let vm_id = vm["id"].as_str().unwrap().to_string();
    let limit = vm
        .pointer("/properties/hardwareProfile/vmSize")
        .and_then(Value::as_str)
        .and_then(max_data_disks)
        .unwrap_or(64) as usize;
    let mut kept = Vec::new();
    let mut luns = std::collections::BTreeSet::new();
    let mut attach = Vec::new();
    let mut detach = Vec::new();
    for e in entries {
        let Some(lun) = e.get("lun").and_then(Value::as_u64).filter(|l| *l < 64) else {
            s.problems.push(format!("PATCH VM: bad lun in {e}"));
            return arm_error(400, "InvalidParameter", "lun must be 0 to 63");
        };
        if e["createOption"] != "Attach" {
            s.problems
                .push(format!("PATCH VM: createOption {}", e["createOption"]));
            return arm_error(400, "InvalidParameter", "createOption must be Attach");
        }
        let disk_id = e
            .pointer("/managedDisk/id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_lowercase();
        let Some(disk) = s.disks.get(&disk_id) else {
            return arm_error(404, "NotFound", &format!("Disk '{disk_id}' was not found."));
        };
        // Compute 2024-07-01 DataDisk.detachOption (DiskDetachOptionTypes):
        // only `ForceDetach`, and only on a disk being detached.
        let force = match e.get("detachOption") {
            None => false,
            Some(o) if o == "ForceDetach" && e.get("toBeDetached") == Some(&json!(true)) => true,
            Some(o) => {
                s.problems
                    .push(format!("PATCH VM: detachOption {o} in {e}"));
                return arm_error(
                    400,
                    "InvalidParameter",
                    "detachOption must be ForceDetach on a disk being detached",
                );
            }
        };
        if e.get("toBeDetached") == Some(&json!(true)) {
            if s.stuck_detach.contains(&disk_id) && !force {
                kept.push(e.clone());
                luns.insert(lun);
            } else {
                detach.push(disk_id);
            }
            continue;
        }
        let caching = e["caching"].as_str().unwrap_or("");
        let sku = disk
            .pointer("/sku/name")
            .and_then(Value::as_str)
            .and_then(Sku::parse)
            .unwrap();
        if !matches!(caching, "None" | "ReadOnly" | "ReadWrite")
            || (sku.is_performance_tier() && caching != "None")
        {
            s.problems.push(format!(
                "PATCH VM: caching {caching:?} for {}",
                sku.as_str()
            ));
            return arm_error(
                400,
                "InvalidParameter",
                &format!("caching {caching} is not allowed for {}", sku.as_str()),
            );
        }
        if !luns.insert(lun) {
            return arm_error(
                400,
                "InvalidParameter",
                &format!("A disk at LUN {lun} already exists."),
            );
        }
        match disk.get("managedBy").and_then(Value::as_str) {
            Some(other) if !other.eq_ignore_ascii_case(&vm_id) => {
                return arm_error(
                    409,
                    "OperationNotAllowed",
                    &format!("Disk {disk_id} is already attached to VM {other}."),
                );
            }
            Some(_) => {}
            None => attach.push(disk_id),
        }
        let mut entry = e.clone();
        entry["toBeDetached"] = json!(false);
        kept.push(entry);
    }
    if kept.len() > limit {
        return arm_error(
            409,
            "OperationNotAllowed",
            &format!(
                "The maximum number of data disks allowed to be attached to a VM of this size is {limit}."
            ),
        );
    }
    // The list replaces the VM's: a disk it no longer names is detached
    // (which is why a writer with a stale list detaches others' disks).
    let named: Vec<String> = entries
        .iter()
        .filter_map(|e| e.pointer("/managedDisk/id").and_then(Value::as_str))
        .map(str::to_ascii_lowercase)
        .collect();
    for e in vm
        .pointer("/properties/storageProfile/dataDisks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(id) = e.pointer("/managedDisk/id").and_then(Value::as_str)
            && !named.contains(&id.to_ascii_lowercase())
        {
            detach.push(id.to_ascii_lowercase());
        }
    }
    for id in attach {
        if let Some(d) = s.disks.get_mut(&id) {
            d["managedBy"] = json!(vm_id);
            d["properties"]["diskState"] = json!("Attached");
        }
    }
    for id in detach {
        if let Some(d) = s.disks.get_mut(&id)
            && let Some(o) = d.as_object_mut()
        {
            o.remove("managedBy");
            d["properties"]["diskState"] = json!("Unattached");
        }
    }
    let v = s.vms.get_mut(path).unwrap();
    v["properties"]["storageProfile"]["dataDisks"] = json!(kept);
    v["properties"]["provisioningState"] = json!("Updating");
    bump_etag(v);
    let out = v.clone();
    s.busy.insert(path.to_string(), true);
    start_op(
        s,
        base,
        200,
        Finish::VmUpdated {
            key: path.to_string(),
        },
        out,
        false,
    )
}
