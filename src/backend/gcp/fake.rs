//! An in-process fake of the Compute Engine REST endpoints the backend calls,
//! answering with the documented shapes: resources with string int64 fields and
//! full `https://www.googleapis.com/compute/v1/…` links, Operations that go
//! PENDING → RUNNING → DONE over successive `wait` calls (and take effect when
//! DONE), `requestId` deduplication, error bodies
//! `{"error":{"code","message","errors":[{"domain","reason","message"}]}}`.
//! It checks request shapes (paths, query, JSON bodies) and answers 400 to a
//! malformed one, and can inject answers (throttling, errors) and failed
//! operations.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::test_http::{Answer, Exchange, serve};

pub const PROJECT: &str = "test-project";
const ROOT: &str = "https://www.googleapis.com/compute/v1/";
const TYPES: [&str; 7] = [
    "pd-standard",
    "pd-balanced",
    "pd-ssd",
    "pd-extreme",
    "hyperdisk-balanced",
    "hyperdisk-throughput",
    "hyperdisk-extreme",
];

/// A Hyperdisk's provisioned performance for `size` GiB, as Compute Engine's
/// Hyperdisk limits state them (the "Size and performance limits" of each
/// type's page) and the PD CSI driver's `GetMinIopsThroughput` encodes their
/// floors: Hyperdisk Balanced 4 GiB–64 TiB, IOPS from min(500 × GiB, 3,000) to
/// min(500 × GiB, 160,000), throughput 140–2,400 MiB/s; Hyperdisk Extreme
/// 64 GiB–64 TiB, IOPS from max(2 × GiB, 128) to 350,000, no throughput;
/// Hyperdisk Throughput 2–32 TiB, throughput from 10 MiB/s per TiB (at least
/// 20) to 600, no IOPS. Missing values take the floor (Compute's defaults are
/// never below it). `Err` is the field and why.
fn hyperdisk_performance(
    ty: &str,
    size: i64,
    iops: Option<i64>,
    throughput: Option<i64>,
) -> Result<(Option<i64>, Option<i64>), String> {
    let check = |field: &str, v: Option<i64>, min: i64, max: i64| match v {
        None => Ok(min),
        Some(v) if (min..=max).contains(&v) => Ok(v),
        Some(v) => Err(format!(
            "Invalid value for field 'resource.{field}': '{v}'. Must be between {min} and {max} \
             for a {ty} disk of {size} GB."
        )),
    };
    let refuse = |field: &str, v: Option<i64>| match v {
        Some(_) => Err(format!(
            "Invalid value for field 'resource.{field}': {ty} disks do not take it."
        )),
        None => Ok(()),
    };
    let sized = |min: i64, max: i64| {
        if (min..=max).contains(&size) {
            Ok(())
        } else {
            Err(format!(
                "Invalid value for field 'resource.sizeGb': '{size}'. {ty} disks are {min} to \
                 {max} GB."
            ))
        }
    };
    match ty {
        "hyperdisk-balanced" => {
            sized(4, 65_536)?;
            let i = check(
                "provisionedIops",
                iops,
                (500 * size).min(3000),
                (500 * size).min(160_000),
            )?;
            let t = check("provisionedThroughput", throughput, 140, 2400)?;
            Ok((Some(i), Some(t)))
        }
        "hyperdisk-extreme" => {
            sized(64, 65_536)?;
            refuse("provisionedThroughput", throughput)?;
            let i = check("provisionedIops", iops, (2 * size).max(128), 350_000)?;
            Ok((Some(i), None))
        }
        "hyperdisk-throughput" => {
            sized(2048, 32_768)?;
            refuse("provisionedIops", iops)?;
            let t = check(
                "provisionedThroughput",
                throughput,
                ((10 * size + 1023) / 1024).max(20),
                600,
            )?;
            Ok((None, Some(t)))
        }
        _ => {
            // Persistent Disk: only pd-extreme provisions IOPS, none throughput.
            if ty != "pd-extreme" {
                refuse("provisionedIops", iops)?;
            }
            refuse("provisionedThroughput", throughput)?;
            Ok((iops, None))
        }
    }
}

/// A request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub body: Value,
}

#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Value,
}

pub fn reply(status: u16, body: Value) -> Reply {
    Reply {
        status,
        headers: vec![],
        body,
    }
}

/// The documented Compute error body.
pub fn error(status: u16, reason: &str, message: &str) -> Reply {
    reply(
        status,
        json!({"error": {"code": status, "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}]}}),
    )
}

/// An answer to inject: to the next `times` requests whose method is `method`
/// and whose path contains `path_part`.
struct Injection {
    method: &'static str,
    path_part: String,
    times: usize,
    reply: Reply,
    /// Handle the request first, then answer `reply` (a lost answer).
    after: bool,
}

enum Effect {
    Put(String, Value),
    Delete(String),
    Patch(String, Box<dyn FnOnce(&mut Value) + Send>),
    Attach {
        instance: String,
        disk: String,
        attached: Value,
        /// Detach it from every other VM first.
        force: bool,
    },
    Detach {
        instance: String,
        device: String,
    },
}

struct Op {
    json: Value,
    /// Waits still needed before DONE.
    remaining: u32,
    effect: Option<Effect>,
    /// The error it ends with instead of its effect.
    fails_with: Option<Value>,
}

#[derive(Default)]
pub struct State {
    /// Resources by path relative to the root (`projects/p/zones/z/disks/d`).
    pub resources: BTreeMap<String, Value>,
    ops: HashMap<String, Op>,
    request_ids: HashMap<String, String>,
    injections: Vec<Injection>,
    fail_next_operation: VecDeque<Value>,
    pub seen: Vec<Seen>,
    next_id: u64,
    /// Page size of list answers (the backend must follow pages).
    pub page_size: usize,
}

#[derive(Clone)]
pub struct Fake {
    pub state: Arc<Mutex<State>>,
    pub url: String,
}

fn link(path: &str) -> String {
    format!("{ROOT}{path}")
}

fn relative(url: &str) -> &str {
    url.strip_prefix(ROOT).unwrap_or(url)
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn valid_name(s: &str) -> bool {
    crate::backend::gcp::params::is_resource_name(s)
}

/// Compute's label rules: at most 64 labels; keys 1–63 characters starting with
/// a lowercase letter, values 0–63, both of lowercase letters, digits, `_`, `-`.
fn labels_ok(labels: &Value) -> bool {
    let part = |s: &str| {
        s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    match labels {
        Value::Null => true,
        Value::Object(m) => {
            m.len() <= 64
                && m.iter().all(|(k, v)| {
                    k.starts_with(|c: char| c.is_ascii_lowercase())
                        && part(k)
                        && v.as_str().is_some_and(part)
                })
        }
        _ => false,
    }
}

/// A label fingerprint: base64 of opaque bytes, in the URL-safe alphabet that
/// google-cloud-compute-v1 decodes it with.
fn fingerprint(n: u64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE
        .encode(n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes())
}

fn valid_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}

impl Fake {
    pub async fn start() -> Fake {
        let state = Arc::new(Mutex::new(State {
            page_size: 2,
            next_id: 1000,
            ..State::default()
        }));
        let shared = state.clone();
        let url = serve(|_| {
            move |seen: Exchange| {
                let body = if seen.body.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&seen.body).unwrap_or(Value::String(
                        String::from_utf8_lossy(&seen.body).into_owned(),
                    ))
                };
                let r = shared.lock().unwrap().handle(Seen {
                    method: seen.method,
                    path: seen.path,
                    query: seen.query,
                    body,
                });
                let mut headers =
                    vec![("content-type".to_string(), "application/json".to_string())];
                headers.extend(r.headers.into_iter().map(|(k, v)| (k.to_string(), v)));
                Answer {
                    status: r.status,
                    headers,
                    body: r.body.to_string().into_bytes(),
                }
            }
        })
        .await;
        Fake { state, url }
    }

    pub fn inject(&self, method: &'static str, path_part: &str, times: usize, reply: Reply) {
        self.state.lock().unwrap().injections.push(Injection {
            method,
            path_part: path_part.to_string(),
            times,
            reply,
            after: false,
        });
    }

    /// The next matching request takes effect, but its answer is `reply` (as
    /// when a proxy or the network loses Compute's answer).
    pub fn lose_answer(&self, method: &'static str, path_part: &str, reply: Reply) {
        self.state.lock().unwrap().injections.push(Injection {
            method,
            path_part: path_part.to_string(),
            times: 1,
            reply,
            after: true,
        });
    }

    /// The next operation started ends DONE with this Compute error.
    pub fn fail_next_operation(&self, code: &str, message: &str, http: u16) {
        self.state
            .lock()
            .unwrap()
            .fail_next_operation
            .push_back(json!({"code": code, "message": message, "http": http}));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    pub fn clear_seen(&self) {
        self.state.lock().unwrap().seen.clear();
    }

    pub fn resource(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().resources.get(path).cloned()
    }

    pub fn put(&self, path: &str, value: Value) {
        self.state
            .lock()
            .unwrap()
            .resources
            .insert(path.to_string(), value);
    }

    /// A VM in `zone`.
    pub fn add_instance(&self, zone: &str, name: &str) {
        self.add_instance_of(zone, name, "n2-standard-4");
    }

    /// A VM of `machine_type` in `zone`.
    pub fn add_instance_of(&self, zone: &str, name: &str, machine_type: &str) {
        let path = format!("projects/{PROJECT}/zones/{zone}/instances/{name}");
        self.put(
            &path,
            json!({"kind": "compute#instance", "id": "77", "name": name,
                "zone": link(&format!("projects/{PROJECT}/zones/{zone}")),
                "machineType": link(&format!("projects/{PROJECT}/zones/{zone}/machineTypes/{machine_type}")),
                "status": "RUNNING", "selfLink": link(&path),
                "disks": [{"kind": "compute#attachedDisk", "type": "PERSISTENT", "mode": "READ_WRITE",
                    "source": link(&format!("projects/{PROJECT}/zones/{zone}/disks/{name}-boot")),
                    "deviceName": "persistent-disk-0", "index": 0, "boot": true, "autoDelete": true,
                    "interface": "SCSI"}]}),
        );
    }
}

impl State {
    fn handle(&mut self, seen: Seen) -> Reply {
        self.seen.push(seen.clone());
        if let Some(i) = self
            .injections
            .iter_mut()
            .find(|i| i.times > 0 && i.method == seen.method && seen.path.contains(&i.path_part))
        {
            i.times -= 1;
            let reply = i.reply.clone();
            if !i.after {
                return reply;
            }
            self.route(&seen);
            return reply;
        }
        self.route(&seen)
    }

    fn route(&mut self, seen: &Seen) -> Reply {
        let seen = seen.clone();
        let Some(path) = seen.path.strip_prefix("/compute/v1/") else {
            return error(404, "notFound", &format!("no route {}", seen.path));
        };
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() < 2 || parts[0] != "projects" || parts[1] != PROJECT {
            return error(404, "notFound", &format!("no project in {path}"));
        }
        let m = seen.method.as_str();
        match (m, &parts[2..]) {
            ("GET", ["aggregated", "disks"]) => self.aggregated_disks(&seen),
            ("GET", ["global", "snapshots"]) => self.list_snapshots(&seen),
            ("POST", ["global", "snapshots"]) => self.insert_snapshot(&seen),
            ("POST", [scope @ ("zones" | "regions"), loc, "disks"]) => {
                self.insert_disk(&seen, scope, loc)
            }
            ("POST", [scope @ ("zones" | "regions"), loc, "disks", disk, "resize"]) => {
                self.resize(&seen, &format!("projects/{PROJECT}/{scope}/{loc}"), disk)
            }
            (
                "POST",
                [
                    scope @ ("zones" | "regions"),
                    loc,
                    "disks",
                    disk,
                    "setLabels",
                ],
            ) => self.set_labels(&seen, &format!("projects/{PROJECT}/{scope}/{loc}"), disk),
            ("POST", ["zones", zone, "instances", inst, "attachDisk"]) => {
                self.attach(&seen, zone, inst)
            }
            ("POST", ["zones", zone, "instances", inst, "detachDisk"]) => {
                self.detach(&seen, zone, inst)
            }
            ("POST", [.., "operations", name, "wait"]) => self.wait(path, name),
            ("PATCH", [scope @ ("zones" | "regions"), loc, "disks", disk]) => {
                self.update_disk(&seen, &format!("projects/{PROJECT}/{scope}/{loc}"), disk)
            }
            ("GET", _) => match self.resources.get(path) {
                Some(v) => reply(200, v.clone()),
                None => error(
                    404,
                    "notFound",
                    &format!("The resource '{path}' was not found"),
                ),
            },
            ("DELETE", [.., kind @ ("disks" | "snapshots"), _]) => self.delete(&seen, path, kind),
            _ => error(404, "notFound", &format!("no route {m} {path}")),
        }
    }

    fn bad(message: &str) -> Reply {
        error(400, "invalid", message)
    }

    fn request_id(&self, seen: &Seen) -> Result<Option<String>, Reply> {
        match seen.query.get("requestId") {
            None => Ok(None),
            Some(id) if valid_uuid(id) => Ok(Some(id.clone())),
            Some(id) => Err(Self::bad(&format!(
                "Invalid value for field 'requestId': '{id}'"
            ))),
        }
    }

    /// Starts an operation in `scope` (`projects/p/zones/z`, `…/regions/r` or
    /// `…/global`) that applies `effect` when DONE.
    fn operation(
        &mut self,
        seen: &Seen,
        scope: &str,
        kind: &str,
        target: &str,
        effect: Effect,
    ) -> Reply {
        let rid = match self.request_id(seen) {
            Ok(r) => r,
            Err(e) => return e,
        };
        if let Some(rid) = &rid
            && let Some(name) = self.request_ids.get(rid)
        {
            return reply(200, self.ops[name].json.clone());
        }
        self.next_id += 1;
        let name = format!("operation-{}-{kind}", self.next_id);
        let mut op = json!({"kind": "compute#operation", "id": self.next_id.to_string(),
            "name": name, "operationType": kind, "targetLink": link(target),
            "status": "PENDING", "progress": 0,
            "selfLink": link(&format!("{scope}/operations/{name}")),
            "insertTime": "2026-11-29T20:00:00.000-08:00"});
        if let Some(zone) = scope.split("/zones/").nth(1) {
            op["zone"] = json!(link(&format!("projects/{PROJECT}/zones/{zone}")));
        } else if let Some(region) = scope.split("/regions/").nth(1) {
            op["region"] = json!(link(&format!("projects/{PROJECT}/regions/{region}")));
        }
        let fails_with = self.fail_next_operation.pop_front();
        self.ops.insert(
            name.clone(),
            Op {
                json: op.clone(),
                remaining: 2,
                effect: Some(effect),
                fails_with,
            },
        );
        if let Some(rid) = rid {
            self.request_ids.insert(rid, name);
        }
        reply(200, op)
    }

    fn wait(&mut self, path: &str, name: &str) -> Reply {
        let Some(op) = self.ops.get_mut(name) else {
            return error(
                404,
                "notFound",
                &format!("The resource '{path}' was not found"),
            );
        };
        let scope_ok = op.json["selfLink"]
            .as_str()
            .is_some_and(|l| format!("{}/wait", relative(l)) == path);
        if !scope_ok {
            return Self::bad(&format!("operation {name} is not in the scope of {path}"));
        }
        if op.remaining > 0 {
            op.remaining -= 1;
            op.json["status"] = json!(if op.remaining == 0 { "DONE" } else { "RUNNING" });
            op.json["progress"] = json!(if op.remaining == 0 { 100 } else { 50 });
            if op.remaining == 0 {
                match op.fails_with.take() {
                    Some(f) => {
                        op.json["error"] =
                            json!({"errors": [{"code": f["code"], "message": f["message"]}]});
                        op.json["httpErrorStatusCode"] = f["http"].clone();
                        op.json["httpErrorMessage"] = json!("ERROR");
                        op.effect = None;
                    }
                    None => {
                        let effect = op.effect.take();
                        let json = op.json.clone();
                        if let Some(e) = effect {
                            self.apply(e);
                        }
                        return reply(200, json);
                    }
                }
            }
        }
        reply(200, op.json.clone())
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Put(path, v) => {
                self.resources.insert(path, v);
            }
            Effect::Delete(path) => {
                self.resources.remove(&path);
            }
            Effect::Patch(path, f) => {
                if let Some(v) = self.resources.get_mut(&path) {
                    f(v);
                }
            }
            Effect::Attach {
                instance,
                disk,
                attached,
                force,
            } => {
                if force {
                    let me = link(&instance);
                    let others: Vec<String> = self.resources[&disk]["users"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|u| **u != json!(me))
                        .filter_map(|u| u.as_str().map(|u| relative(u).to_string()))
                        .collect();
                    let source = json!(link(&disk));
                    for other in others {
                        if let Some(i) = self.resources.get_mut(&other) {
                            i["disks"]
                                .as_array_mut()
                                .unwrap()
                                .retain(|d| d["source"] != source);
                        }
                    }
                    if let Some(d) = self.resources.get_mut(&disk) {
                        d["users"]
                            .as_array_mut()
                            .unwrap()
                            .retain(|u| *u == json!(me));
                    }
                }
                if let Some(i) = self.resources.get_mut(&instance) {
                    i["disks"].as_array_mut().unwrap().push(attached);
                }
                if let Some(d) = self.resources.get_mut(&disk) {
                    d["users"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!(link(&instance)));
                }
            }
            Effect::Detach { instance, device } => {
                let mut source = None;
                if let Some(i) = self.resources.get_mut(&instance) {
                    let disks = i["disks"].as_array_mut().unwrap();
                    if let Some(pos) = disks.iter().position(|d| d["deviceName"] == json!(device)) {
                        source = disks.remove(pos)["source"]
                            .as_str()
                            .map(|s| relative(s).to_string());
                    }
                }
                if let Some(d) = source.and_then(|s| self.resources.get_mut(&s)) {
                    let me = json!(link(&instance));
                    d["users"].as_array_mut().unwrap().retain(|u| u != &me);
                }
            }
        }
    }

    fn insert_disk(&mut self, seen: &Seen, scope: &str, loc: &str) -> Reply {
        let b = &seen.body;
        let Some(name) = b["name"].as_str().filter(|n| valid_name(n)) else {
            return Self::bad(&format!(
                "Invalid value for field 'resource.name': {}",
                b["name"]
            ));
        };
        let scope_path = format!("projects/{PROJECT}/{scope}/{loc}");
        let path = format!("{scope_path}/disks/{name}");
        if self.resources.contains_key(&path) {
            return error(
                409,
                "alreadyExists",
                &format!("The resource '{path}' already exists"),
            );
        }
        let Some(size) = int(&b["sizeGb"]).filter(|s| *s > 0) else {
            return Self::bad("Invalid value for field 'resource.sizeGb'");
        };
        let ty = b["type"].as_str().map(relative).unwrap_or("");
        let type_ok = ty
            .strip_prefix(&format!("{scope_path}/diskTypes/"))
            .is_some_and(|t| TYPES.contains(&t));
        if !type_ok {
            return Self::bad(&format!("Invalid value for field 'resource.type': '{ty}'"));
        }
        if !labels_ok(&b["labels"]) {
            return Self::bad(&format!(
                "Invalid value for field 'resource.labels': {}",
                b["labels"]
            ));
        }
        let ty_name = ty.rsplit('/').next().unwrap_or("").to_string();
        let performance = hyperdisk_performance(
            &ty_name,
            size,
            b.get("provisionedIops").and_then(int),
            b.get("provisionedThroughput").and_then(int),
        );
        let (iops, throughput) = match performance {
            Ok(p) => p,
            Err(m) => return Self::bad(&m),
        };
        let mut disk = b.clone();
        if let Some(i) = iops {
            disk["provisionedIops"] = json!(i.to_string());
        }
        if let Some(t) = throughput {
            disk["provisionedThroughput"] = json!(t.to_string());
        }
        if scope == "regions" {
            let zones: Vec<&str> = b["replicaZones"]
                .as_array()
                .map(|a| a.iter().filter_map(|z| z.as_str()).map(relative).collect())
                .unwrap_or_default();
            let in_region = zones.iter().all(|z| {
                z.strip_prefix(&format!("projects/{PROJECT}/zones/"))
                    .is_some_and(|z| z.starts_with(&format!("{loc}-")))
            });
            if zones.len() != 2 || !in_region || zones[0] == zones[1] {
                return Self::bad("Invalid value for field 'resource.replicaZones'");
            }
            disk["replicaZones"] = json!(zones.iter().map(|z| link(z)).collect::<Vec<_>>());
            disk["region"] = json!(link(&scope_path));
        } else {
            if b.get("replicaZones").is_some() {
                return Self::bad("replicaZones is for regional disks");
            }
            disk["zone"] = json!(link(&scope_path));
        }
        // A source (snapshot or disk) must exist and be no larger than the disk.
        for (field, size_field, too_big) in [
            (
                "sourceSnapshot",
                "diskSizeGb",
                "Requested disk size cannot be smaller than the snapshot size",
            ),
            (
                "sourceDisk",
                "sizeGb",
                "Requested disk size cannot be smaller than the source disk",
            ),
        ] {
            let Some(src) = b[field].as_str() else {
                continue;
            };
            match self.resources.get(relative(src)) {
                None => {
                    return error(
                        404,
                        "notFound",
                        &format!("The resource '{src}' was not found"),
                    );
                }
                Some(s) if int(&s[size_field]).unwrap_or(0) > size => return Self::bad(too_big),
                Some(_) => disk[field] = json!(link(relative(src))),
            }
        }
        self.next_id += 1;
        disk["kind"] = json!("compute#disk");
        disk["id"] = json!(self.next_id.to_string());
        disk["sizeGb"] = json!(size.to_string());
        disk["type"] = json!(link(ty));
        disk["status"] = json!("READY");
        disk["selfLink"] = json!(link(&path));
        disk["users"] = json!([]);
        disk["creationTimestamp"] = json!("2026-11-29T12:00:00.000-08:00");
        disk["labelFingerprint"] = json!(fingerprint(self.next_id));
        self.operation(
            seen,
            &scope_path,
            "insert",
            &path,
            Effect::Put(path.clone(), disk),
        )
    }

    fn resize(&mut self, seen: &Seen, scope_path: &str, disk: &str) -> Reply {
        let path = format!("{scope_path}/disks/{disk}");
        let Some(now) = self.resources.get(&path).and_then(|d| int(&d["sizeGb"])) else {
            return error(
                404,
                "notFound",
                &format!("The resource '{path}' was not found"),
            );
        };
        let Some(size) = int(&seen.body["sizeGb"]) else {
            return Self::bad("Invalid value for field 'sizeGb'");
        };
        if size <= now {
            return Self::bad(&format!(
                "Invalid value for field 'sizeGb': '{size}'. New disk size must be larger than {now}"
            ));
        }
        // A resize keeps the provisioned performance, which must still fit the
        // new size: a Hyperdisk Balanced made at 4 GiB (2,000 IOPS) cannot
        // grow to 6 GiB or more this way (its floor is then 3,000).
        let d = &self.resources[&path];
        let ty = d["type"]
            .as_str()
            .unwrap_or("")
            .rsplit('/')
            .next()
            .unwrap_or("");
        if let Err(m) = hyperdisk_performance(
            ty,
            size,
            d.get("provisionedIops").and_then(int),
            d.get("provisionedThroughput").and_then(int),
        ) {
            return Self::bad(&m);
        }
        self.operation(
            seen,
            scope_path,
            "resize",
            &path,
            Effect::Patch(
                path.clone(),
                Box::new(move |d| d["sizeGb"] = json!(size.to_string())),
            ),
        )
    }

    /// `disks.update` / `regionDisks.update` (PATCH of the disk): sets the
    /// fields the `updateMask` (or a `paths`) names, from the body; the size
    /// may only grow, and the result must meet the type's limits
    /// ([`hyperdisk_performance`]). Fields the fake does not update are refused
    /// rather than ignored, so that a request relying on them fails here.
    fn update_disk(&mut self, seen: &Seen, scope_path: &str, disk: &str) -> Reply {
        let path = format!("{scope_path}/disks/{disk}");
        let Some(now) = self.resources.get(&path).cloned() else {
            return error(
                404,
                "notFound",
                &format!("The resource '{path}' was not found"),
            );
        };
        let mask = seen
            .query
            .get("updateMask")
            .or_else(|| seen.query.get("paths"))
            .cloned()
            .unwrap_or_default();
        let fields: Vec<&str> = mask.split(',').filter(|f| !f.is_empty()).collect();
        if fields.is_empty() {
            return Self::bad("Required field 'updateMask' or 'paths' not specified");
        }
        const UPDATABLE: [&str; 3] = ["sizeGb", "provisionedIops", "provisionedThroughput"];
        if let Some(f) = fields.iter().find(|f| !UPDATABLE.contains(f)) {
            return Self::bad(&format!("Invalid value for field 'updateMask': '{f}'"));
        }
        let b = &seen.body;
        let get = |field: &str, current: &Value| {
            if fields.contains(&field) {
                b.get(field).and_then(int)
            } else {
                current.get(field).and_then(int)
            }
        };
        let size_now = int(&now["sizeGb"]).unwrap_or(0);
        let Some(size) = get("sizeGb", &now) else {
            return Self::bad("Invalid value for field 'resource.sizeGb'");
        };
        if size < size_now {
            return Self::bad(&format!(
                "Invalid value for field 'resource.sizeGb': '{size}'. Disks cannot shrink from \
                 {size_now}"
            ));
        }
        let ty = now["type"]
            .as_str()
            .unwrap_or("")
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string();
        let (iops, throughput) = match hyperdisk_performance(
            &ty,
            size,
            get("provisionedIops", &now),
            get("provisionedThroughput", &now),
        ) {
            Ok(p) => p,
            Err(m) => return Self::bad(&m),
        };
        self.operation(
            seen,
            scope_path,
            "update",
            &path,
            Effect::Patch(
                path.clone(),
                Box::new(move |d| {
                    d["sizeGb"] = json!(size.to_string());
                    if let Some(i) = iops {
                        d["provisionedIops"] = json!(i.to_string());
                    }
                    if let Some(t) = throughput {
                        d["provisionedThroughput"] = json!(t.to_string());
                    }
                }),
            ),
        )
    }

    /// `disks.setLabels` / `regionDisks.setLabels`: replaces every label, if the
    /// fingerprint names the labels there now (else 412 conditionNotMet).
    fn set_labels(&mut self, seen: &Seen, scope_path: &str, disk: &str) -> Reply {
        let path = format!("{scope_path}/disks/{disk}");
        let Some(now) = self.resources.get(&path) else {
            return error(
                404,
                "notFound",
                &format!("The resource '{path}' was not found"),
            );
        };
        let b = &seen.body;
        let fields_ok = b
            .as_object()
            .is_some_and(|o| o.keys().all(|k| k == "labels" || k == "labelFingerprint"));
        if !fields_ok || !labels_ok(&b["labels"]) {
            return Self::bad(&format!("Invalid value for field 'labels': {b}"));
        }
        if b["labelFingerprint"] != now["labelFingerprint"] {
            return error(
                412,
                "conditionNotMet",
                &format!(
                    "Labels fingerprint either invalid or resource labels have changed: {}",
                    b["labelFingerprint"]
                ),
            );
        }
        self.next_id += 1;
        let labels = b["labels"].clone();
        let new_fingerprint = fingerprint(self.next_id);
        self.operation(
            seen,
            scope_path,
            "setLabels",
            &path,
            Effect::Patch(
                path.clone(),
                Box::new(move |d| {
                    d["labels"] = labels;
                    d["labelFingerprint"] = json!(new_fingerprint);
                }),
            ),
        )
    }

    fn delete(&mut self, seen: &Seen, path: &str, kind: &str) -> Reply {
        let Some(res) = self.resources.get(path) else {
            return error(
                404,
                "notFound",
                &format!("The resource '{path}' was not found"),
            );
        };
        if kind == "disks"
            && let Some(user) = res["users"].as_array().and_then(|u| u.first())
        {
            return error(
                400,
                "resourceInUseByAnotherResource",
                &format!(
                    "The disk resource '{path}' is already being used by '{}'",
                    relative(user.as_str().unwrap_or(""))
                ),
            );
        }
        if kind == "snapshots" {
            let me = link(path);
            if self
                .resources
                .values()
                .any(|r| r["sourceSnapshot"] == json!(me) && r["status"] == json!("CREATING"))
            {
                return error(400, "resourceInUseByAnotherResource", "snapshot in use");
            }
        }
        let scope = path.rsplitn(3, '/').nth(2).unwrap_or("").to_string();
        self.operation(
            seen,
            &scope,
            "delete",
            path,
            Effect::Delete(path.to_string()),
        )
    }

    fn attach(&mut self, seen: &Seen, zone: &str, inst: &str) -> Reply {
        let instance = format!("projects/{PROJECT}/zones/{zone}/instances/{inst}");
        let Some(vm) = self.resources.get(&instance) else {
            return error(
                404,
                "notFound",
                &format!("The resource '{instance}' was not found"),
            );
        };
        let b = &seen.body;
        let source = b["source"].as_str().map(relative).unwrap_or("").to_string();
        let Some(disk) = self.resources.get(&source) else {
            return error(
                404,
                "notFound",
                &format!("The resource '{source}' was not found"),
            );
        };
        let mode = b["mode"].as_str().unwrap_or("READ_WRITE");
        if !matches!(mode, "READ_WRITE" | "READ_ONLY") || b["type"] != json!("PERSISTENT") {
            return Self::bad("Invalid value for field 'resource.mode' or 'resource.type'");
        }
        let Some(device) = b["deviceName"].as_str().filter(|d| valid_name(d)) else {
            return Self::bad("Invalid value for field 'resource.deviceName'");
        };
        if vm["disks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["deviceName"] == json!(device))
        {
            return Self::bad(&format!(
                "Invalid value for field 'resource.deviceName': '{device}' is in use"
            ));
        }
        let zonal_elsewhere = disk["zone"]
            .as_str()
            .is_some_and(|z| !z.ends_with(&format!("/zones/{zone}")));
        if zonal_elsewhere {
            return Self::bad("Disk must be in the same zone as the instance");
        }
        // `forceAttach` (instances.attachDisk's query parameter) takes a
        // regional disk from the VM that holds it; Compute refuses it for a
        // zonal disk.
        let force = seen.query.get("forceAttach").map(String::as_str) == Some("true");
        let regional = disk["region"].is_string();
        if force && !regional {
            return Self::bad("forceAttach is only supported for regional disks");
        }
        let rw_user = disk["users"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u != &json!(link(&instance)));
        if rw_user && mode == "READ_WRITE" && !force {
            return error(
                400,
                "resourceInUseByAnotherResource",
                &format!("The disk resource '{source}' is already being used by another instance"),
            );
        }
        // A Persistent Disk on a Hyperdisk-only machine series: Compute takes
        // the request and the operation ends with UNSUPPORTED_OPERATION, in
        // the words the PD CSI driver matches (`pdDiskTypeUnsupportedPattern`).
        let machine = vm["machineType"]
            .as_str()
            .unwrap_or("")
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string();
        let disk_type = disk["type"]
            .as_str()
            .unwrap_or("")
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string();
        if disk_type.starts_with("pd-") && crate::backend::gcp::machine::hyperdisk_only(&machine) {
            self.fail_next_operation.push_front(json!({"code": "UNSUPPORTED_OPERATION",
                "message": format!("[{disk_type}] features are not compatible for creating instance."),
                "http": 400}));
        }
        let attached = json!({"kind": "compute#attachedDisk", "type": "PERSISTENT", "mode": mode,
            "source": link(&source), "deviceName": device, "index": 1, "boot": false,
            "autoDelete": b["autoDelete"].as_bool().unwrap_or(false), "interface": "SCSI"});
        let scope = format!("projects/{PROJECT}/zones/{zone}");
        self.operation(
            seen,
            &scope,
            "attachDisk",
            &instance,
            Effect::Attach {
                instance: instance.clone(),
                disk: source,
                attached,
                force,
            },
        )
    }

    fn detach(&mut self, seen: &Seen, zone: &str, inst: &str) -> Reply {
        let instance = format!("projects/{PROJECT}/zones/{zone}/instances/{inst}");
        let Some(vm) = self.resources.get(&instance) else {
            return error(
                404,
                "notFound",
                &format!("The resource '{instance}' was not found"),
            );
        };
        let Some(device) = seen.query.get("deviceName").cloned() else {
            return Self::bad("Required field 'deviceName' not specified");
        };
        if !vm["disks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["deviceName"] == json!(device))
        {
            return Self::bad(&format!(
                "No attached disk found with device name '{device}'"
            ));
        }
        let scope = format!("projects/{PROJECT}/zones/{zone}");
        self.operation(
            seen,
            &scope,
            "detachDisk",
            &instance,
            Effect::Detach {
                instance: instance.clone(),
                device,
            },
        )
    }

    fn insert_snapshot(&mut self, seen: &Seen) -> Reply {
        let b = &seen.body;
        let Some(name) = b["name"].as_str().filter(|n| valid_name(n)) else {
            return Self::bad("Invalid value for field 'resource.name'");
        };
        let path = format!("projects/{PROJECT}/global/snapshots/{name}");
        if self.resources.contains_key(&path) {
            return error(
                409,
                "alreadyExists",
                &format!("The resource '{path}' already exists"),
            );
        }
        let source = b["sourceDisk"]
            .as_str()
            .map(relative)
            .unwrap_or("")
            .to_string();
        let Some(disk) = self.resources.get(&source) else {
            return error(
                404,
                "notFound",
                &format!("The resource '{source}' was not found"),
            );
        };
        if !labels_ok(&b["labels"]) {
            return Self::bad(&format!(
                "Invalid value for field 'resource.labels': {}",
                b["labels"]
            ));
        }
        let mut snap = b.clone();
        self.next_id += 1;
        snap["kind"] = json!("compute#snapshot");
        snap["id"] = json!(self.next_id.to_string());
        snap["status"] = json!("READY");
        snap["diskSizeGb"] = disk["sizeGb"].clone();
        snap["sourceDisk"] = json!(link(&source));
        snap["selfLink"] = json!(link(&path));
        snap["storageBytes"] = json!("1024");
        snap["creationTimestamp"] = json!("2026-11-29T12:30:00.250-08:00");
        let scope = format!("projects/{PROJECT}/global");
        self.operation(
            seen,
            &scope,
            "insert",
            &path,
            Effect::Put(path.clone(), snap),
        )
    }

    /// `labels.KEY = "VALUE"`, the only filter form the backend sends.
    fn filter(seen: &Seen) -> Result<Option<(String, String)>, Reply> {
        let Some(f) = seen.query.get("filter") else {
            return Ok(None);
        };
        let parsed = f.strip_prefix("labels.").and_then(|rest| {
            let (k, v) = rest.split_once(" = ")?;
            Some((
                k.to_string(),
                v.strip_prefix('"')?.strip_suffix('"')?.to_string(),
            ))
        });
        parsed
            .map(Some)
            .ok_or_else(|| Self::bad(&format!("Invalid list filter expression '{f}'")))
    }

    fn matches(v: &Value, filter: &Option<(String, String)>) -> bool {
        filter
            .as_ref()
            .is_none_or(|(k, want)| v["labels"][k].as_str() == Some(want))
    }

    /// Pages of `items` with `pageToken` an offset.
    fn page<T: Clone>(&self, seen: &Seen, items: &[T]) -> Result<(Vec<T>, Option<String>), Reply> {
        let start = match seen.query.get("pageToken").filter(|t| !t.is_empty()) {
            None => 0,
            Some(t) => t
                .strip_prefix("page-")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| Self::bad("Invalid value for field 'pageToken'"))?,
        };
        let end = (start + self.page_size).min(items.len());
        let next = (end < items.len()).then(|| format!("page-{end}"));
        Ok((items[start.min(end)..end].to_vec(), next))
    }

    fn aggregated_disks(&mut self, seen: &Seen) -> Reply {
        if seen.query.get("returnPartialSuccess").map(String::as_str) != Some("true") {
            return Self::bad("aggregated lists should ask for returnPartialSuccess");
        }
        let filter = match Self::filter(seen) {
            Ok(f) => f,
            Err(e) => return e,
        };
        let disks: Vec<(String, Value)> = self
            .resources
            .iter()
            .filter(|(p, v)| p.contains("/disks/") && Self::matches(v, &filter))
            .map(|(p, v)| {
                let scope = p.split('/').skip(2).take(2).collect::<Vec<_>>().join("/");
                (scope, v.clone())
            })
            .collect();
        let (page, next) = match self.page(seen, &disks) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let mut items = serde_json::Map::new();
        // An empty scope carries a warning instead of disks, as Compute's do.
        items.insert(
            "zones/asia-east1-a".into(),
            json!({"warning": {"code": "NO_RESULTS_ON_PAGE", "message": "There are no results for scope 'zones/asia-east1-a' on this page."}}),
        );
        for (scope, disk) in page {
            let entry = items.entry(scope).or_insert_with(|| json!({"disks": []}));
            entry["disks"].as_array_mut().unwrap().push(disk);
        }
        let mut body = json!({"kind": "compute#diskAggregatedList", "items": items,
            "selfLink": link(&format!("projects/{PROJECT}/aggregated/disks"))});
        if let Some(n) = next {
            body["nextPageToken"] = json!(n);
        }
        reply(200, body)
    }

    fn list_snapshots(&mut self, seen: &Seen) -> Reply {
        let filter = match Self::filter(seen) {
            Ok(f) => f,
            Err(e) => return e,
        };
        let snaps: Vec<Value> = self
            .resources
            .iter()
            .filter(|(p, v)| p.contains("/global/snapshots/") && Self::matches(v, &filter))
            .map(|(_, v)| v.clone())
            .collect();
        let (page, next) = match self.page(seen, &snaps) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let mut body = json!({"kind": "compute#snapshotList", "items": page});
        if let Some(n) = next {
            body["nextPageToken"] = json!(n);
        }
        reply(200, body)
    }
}
