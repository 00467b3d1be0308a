//! Disks and snapshots: create (zonal or regional, empty, restored from a
//! snapshot or cloned from a disk), get, list, resize, delete; snapshot create,
//! get, list, delete. Every method checks what exists first, so a retry after
//! any failure converges on one resource.

use std::collections::{BTreeMap, HashMap};

use google_cloud_compute_v1::model;
use serde::{Deserialize, Serialize};

use super::super::{
    Disk, DiskSource, DiskSpec, Error, Result, Snapshot, Topology, check_token, paginate,
};
use super::attach::NodeName;
use super::compute::{ApiError, Kind, gone_is_done};
use super::metadata::last_segment;
use super::params::{self, DiskParams, MAX_DISK_GIB, TOPOLOGY_ZONE};
use super::{GcpBackend, LABEL_DRIVER, LABEL_NAME, LABEL_USABLE, SNAPSHOT_LOCATION};
use crate::volume::{BackendKind, FreshRecord, SnapshotId, VolumeId, fresh};

const GIB: u64 = 1 << 30;

/// Where a disk lives: a zone, or a region for a regional disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Zone(String),
    Region(String),
}

impl Location {
    /// The location of a volume id; `None` when it can be neither (so no disk
    /// of ours is there).
    pub fn of(id: &VolumeId) -> Option<Self> {
        let loc = id.location();
        if params::is_zone(loc) {
            Some(Location::Zone(loc.to_string()))
        } else if params::is_region(loc) {
            Some(Location::Region(loc.to_string()))
        } else {
            None
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Location::Zone(z) | Location::Region(z) => z,
        }
    }

    /// `projects/P/zones/Z/disks/N` or `projects/P/regions/R/disks/N`.
    pub fn disk_path(&self, project: &str, disk: &str) -> String {
        match self {
            Location::Zone(z) => format!("projects/{project}/zones/{z}/disks/{disk}"),
            Location::Region(r) => format!("projects/{project}/regions/{r}/disks/{disk}"),
        }
    }

    fn disk_type_path(&self, project: &str, disk_type: &str) -> String {
        match self {
            Location::Zone(z) => format!("projects/{project}/zones/{z}/diskTypes/{disk_type}"),
            Location::Region(r) => {
                format!("projects/{project}/regions/{r}/diskTypes/{disk_type}")
            }
        }
    }
}

/// A resource URL relative to the API root: from `projects/` on (Compute
/// answers with full `https://…/compute/v1/projects/…` links).
pub fn relative(url: &str) -> &str {
    match url.find("projects/") {
        Some(i) => &url[i..],
        None => url,
    }
}

/// What the description of our disks and snapshots records.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Note {
    /// The CO's name.
    name: String,
    /// A disk's content source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<DiskSource>,
    /// A snapshot's source volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    volume: Option<VolumeId>,
    #[serde(default)]
    options: BTreeMap<String, String>,
    /// A regional disk's attaches are forced (`availability-class:
    /// regional-hard-failover`): recorded with the disk because the
    /// attach is handed nothing but the volume id.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    force_attach: bool,
    /// The key scope a restored or cloned disk inherited, or a snapshot's
    /// source's scope when taken. Here rather than in a label: a scope is a
    /// volume id (`gcp:<zone>:<name>`), whose `:` no label value may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_scope: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Description {
    cryptdisk: Note,
}

impl Note {
    fn to_description(&self) -> String {
        serde_json::to_string(&Description {
            cryptdisk: self.clone(),
        })
        .expect("a note serialises")
    }

    fn from_description(text: Option<&str>) -> Option<Note> {
        serde_json::from_str::<Description>(text?)
            .ok()
            .map(|d| d.cryptdisk)
    }
}

/// A disk of ours as Compute has it and as the backend reports it.
pub struct Found {
    pub disk: Disk,
    pub raw: model::Disk,
    pub location: Location,
    note: Note,
}

impl Found {
    /// The disk's path relative to the API root.
    pub fn path(&self, project: &str) -> String {
        self.location.disk_path(project, self.disk.id.disk())
    }

    /// Whether attaches of this (regional) disk are forced.
    pub fn force_attach(&self) -> bool {
        self.note.force_attach
    }

    /// The disk's type, if it is one this backend knows.
    pub fn disk_type(&self) -> Option<params::DiskType> {
        self.raw
            .r#type
            .as_deref()
            .map(last_segment)
            .and_then(params::DiskType::parse)
    }

    /// Zones the disk can be attached in.
    pub fn zones(&self) -> Vec<String> {
        self.disk
            .topology
            .iter()
            .filter_map(|t| t.get(TOPOLOGY_ZONE).cloned())
            .collect()
    }
}

fn zone_topology(zone: &str) -> Topology {
    Topology::from([(TOPOLOGY_ZONE.to_string(), zone.to_string())])
}

/// A creation timestamp (RFC 3339, as Compute writes it) in Unix nanoseconds.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, rest) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (time, offset_secs) = if let Some(t) = rest.strip_suffix('Z') {
        (t, 0)
    } else {
        let i = rest.rfind(['+', '-'])?;
        let (t, off) = rest.split_at(i);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':')?;
        (
            t,
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60),
        )
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':');
    let (h, mi, sec): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let nanos: i64 = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        format!("{digits:0<9}").parse().ok()?
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_secs;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

impl GcpBackend {
    fn labels(&self, co_name: &str, usable_bytes: Option<u64>) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (LABEL_DRIVER.to_string(), self.driver_label.clone()),
            (LABEL_NAME.to_string(), params::label_value(co_name)),
        ]);
        if let Some(bytes) = usable_bytes {
            labels.insert(LABEL_USABLE.to_string(), bytes.to_string());
        }
        labels
    }

    /// A new disk's labels: [`Self::labels`], and for an empty disk the
    /// fresh-disk record, set in the insert that creates it.
    fn disk_labels(&self, spec: &DiskSpec) -> HashMap<String, String> {
        let mut labels = self.labels(&spec.name, Some(spec.usable_bytes));
        if spec.source.is_none() {
            labels.insert(
                fresh::DISK_KEY.to_string(),
                FreshRecord::new_random().to_string(),
            );
        }
        labels
    }

    /// Removes the fresh-disk record label: `setLabels` with the other labels as
    /// read and the fingerprint they were read with, so a concurrent change of
    /// the labels fails the call (and the CO's retry reads them again) rather
    /// than being overwritten.
    pub(super) async fn clear_fresh_label(&self, id: &VolumeId) -> Result<()> {
        let Some(found) = self.find_disk(id).await? else {
            return Ok(());
        };
        if !found.raw.labels.contains_key(fresh::DISK_KEY) {
            return Ok(());
        }
        let mut labels = found.raw.labels.clone();
        labels.remove(fresh::DISK_KEY);
        let what = format!("clearing the fresh-disk label of {}", id.disk());
        match self.set_labels(id, &found, labels, &what).await {
            Err(Error::NotFound(_)) => {}
            other => other?,
        }
        tracing::info!(volume = %id, "fresh-disk record cleared");
        Ok(())
    }

    fn ours(&self, labels: &HashMap<String, String>) -> bool {
        labels.get(LABEL_DRIVER) == Some(&self.driver_label)
    }

    fn list_filter(&self) -> String {
        format!("labels.{LABEL_DRIVER} = \"{}\"", self.driver_label)
    }

    /// The backend's view of a Compute disk, if it is ours.
    fn to_found(&self, raw: model::Disk) -> Option<Found> {
        if !self.ours(&raw.labels) {
            return None;
        }
        let name = raw.name.clone()?;
        let regional = raw.region.as_deref().is_some_and(|r| !r.is_empty());
        let location = if regional {
            Location::Region(last_segment(raw.region.as_deref()?).to_string())
        } else {
            Location::Zone(last_segment(raw.zone.as_deref()?).to_string())
        };
        let id = VolumeId::new(BackendKind::Gcp, location.name(), &name).ok()?;
        let note = Note::from_description(raw.description.as_deref()).unwrap_or(Note {
            name: name.clone(),
            ..Note::default()
        });
        let topology = match &location {
            Location::Zone(z) => vec![zone_topology(z)],
            Location::Region(_) => raw
                .replica_zones
                .iter()
                .map(|z| zone_topology(last_segment(z)))
                .collect(),
        };
        let mut attached_to: Vec<String> = raw
            .users
            .iter()
            .filter_map(|u| NodeName::from_instance_url(u))
            .map(|n| n.to_string())
            .collect();
        attached_to.sort();
        attached_to.dedup();
        // Only a disk inserted without a source can carry the record.
        let created_empty = raw.source_snapshot.as_deref().unwrap_or("").is_empty()
            && raw.source_disk.as_deref().unwrap_or("").is_empty()
            && raw.source_image.as_deref().unwrap_or("").is_empty()
            && note.source.is_none();
        let fresh = raw
            .labels
            .get(fresh::DISK_KEY)
            .filter(|_| created_empty)
            .and_then(|v| v.parse().ok());
        let disk = Disk {
            id,
            fresh,
            name: note.name.clone(),
            capacity_bytes: raw.size_gb.unwrap_or(0).max(0) as u64 * GIB,
            source: note.source.clone(),
            topology,
            attached_to,
            options: note.options.clone(),
            usable_bytes: usable_of(&raw.labels),
            key_scope: note.key_scope.clone(),
        };
        Some(Found {
            disk,
            raw,
            location,
            note,
        })
    }

    /// The Compute disk `name` at `location`, whoever owns it.
    async fn raw_disk(&self, location: &Location, name: &str) -> Result<Option<model::Disk>> {
        let what = format!("getting disk {name} in {}", location.name());
        let p = self.project();
        let got = match location {
            Location::Zone(z) => {
                self.compute
                    .call(&what, || {
                        self.compute
                            .disks
                            .get()
                            .set_project(p)
                            .set_zone(z)
                            .set_disk(name)
                            .send()
                    })
                    .await
            }
            Location::Region(r) => {
                self.compute
                    .call(&what, || {
                        self.compute
                            .region_disks
                            .get()
                            .set_project(p)
                            .set_region(r)
                            .set_disk(name)
                            .send()
                    })
                    .await
            }
        };
        match got {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind == Kind::NotFound => Ok(None),
            Err(e) => Err(e.into_error(&what)),
        }
    }

    /// The disk of a volume id, if it exists and is ours.
    pub(super) async fn find_disk(&self, id: &VolumeId) -> Result<Option<Found>> {
        let Some(location) = Location::of(id) else {
            return Ok(None);
        };
        Ok(self
            .raw_disk(&location, id.disk())
            .await?
            .and_then(|raw| self.to_found(raw)))
    }

    pub(super) async fn create(&self, spec: &DiskSpec) -> Result<Disk> {
        let params = DiskParams::parse(&spec.parameters)?;
        let name = params::resource_name(&spec.name);
        let p = self.project().to_string();

        // The source: its path, its size, and for a clone its location.
        let mut source_gib = None;
        let mut source_path = None;
        let mut clone_of: Option<Found> = None;
        match &spec.source {
            None => {}
            Some(DiskSource::Snapshot(sid)) => {
                let snap =
                    if sid.backend() == BackendKind::Gcp && sid.location() == SNAPSHOT_LOCATION {
                        self.find_snapshot(sid.snapshot()).await?
                    } else {
                        None
                    };
                let snap = snap.ok_or_else(|| {
                    Error::NotFound(format!("source snapshot {sid} does not exist"))
                })?;
                if !snap.ready {
                    return Err(Error::Aborted(format!(
                        "source snapshot {sid} is not ready yet; retry"
                    )));
                }
                source_gib = Some(snap.size_bytes.div_ceil(GIB));
                source_path = Some(format!("projects/{p}/global/snapshots/{}", sid.snapshot()));
            }
            Some(DiskSource::Disk(vid)) => {
                let found = if vid.backend() == BackendKind::Gcp {
                    self.find_disk(vid).await?
                } else {
                    None
                };
                let found = found.ok_or_else(|| {
                    Error::NotFound(format!("source volume {vid} does not exist"))
                })?;
                let regional = matches!(found.location, Location::Region(_));
                if regional != params.regional {
                    return Err(Error::InvalidArgument(format!(
                        "source volume {vid} is {}, the clone asks for {}; a clone keeps its \
                         source's replication",
                        if regional { "regional" } else { "zonal" },
                        if params.regional { "regional" } else { "zonal" },
                    )));
                }
                source_gib = Some(found.disk.capacity_bytes.div_ceil(GIB));
                source_path = Some(found.path(&p));
                clone_of = Some(found);
            }
        }

        // Zones: a clone stays where its source is.
        let zones = match &clone_of {
            Some(src) => {
                let zones = src.zones();
                if let Some(req) = &spec.accessibility
                    && !zones.iter().all(|z| req.admits(&zone_topology(z)))
                {
                    return Err(Error::ResourceExhausted(format!(
                        "a clone of {} must be in {zones:?}, which the requisite topology does \
                         not allow",
                        src.disk.id
                    )));
                }
                zones
            }
            None => params::pick_zones(
                spec.accessibility.as_ref(),
                &self.config.default_zone,
                params.regional,
            )?,
        };
        let location = if params.regional {
            Location::Region(params::region_of(&zones[0]).to_string())
        } else {
            Location::Zone(zones[0].clone())
        };

        // Size.
        let mut gib = match (spec.capacity_bytes, source_gib) {
            (0, Some(s)) => s.max(params.size_gib(0)),
            (bytes, _) => params.size_gib(bytes),
        };
        if let Some(s) = source_gib {
            if s > gib && spec.capacity_bytes != 0 {
                return Err(Error::OutOfRange(format!(
                    "the source holds {s} GiB, more than the {} bytes asked for",
                    spec.capacity_bytes
                )));
            }
            gib = gib.max(s);
        }
        if gib > MAX_DISK_GIB {
            return Err(Error::OutOfRange(format!(
                "{gib} GiB is above the largest persistent disk ({MAX_DISK_GIB} GiB)"
            )));
        }
        let max = params.disk_type.max_gib();
        if gib > max {
            return Err(Error::OutOfRange(format!(
                "{gib} GiB is above the largest {} disk ({max} GiB)",
                params.disk_type.as_str()
            )));
        }

        let note = Note {
            name: spec.name.clone(),
            source: spec.source.clone(),
            volume: None,
            options: spec.options.clone(),
            force_attach: params.force_attach,
            key_scope: spec.key_scope.clone(),
        };
        let want = Wanted {
            note: &note,
            gib,
            params: &params,
        };
        if let Some(raw) = self.raw_disk(&location, &name).await? {
            return self.existing(raw, &location, &want);
        }

        let mut body = model::Disk::new()
            .set_name(name.clone())
            .set_size_gb(gib as i64)
            .set_type(location.disk_type_path(&p, params.disk_type.as_str()))
            .set_labels(self.disk_labels(spec))
            .set_description(note.to_description());
        if params.regional {
            body = body.set_replica_zones(zones.iter().map(|z| format!("projects/{p}/zones/{z}")));
        }
        match (&spec.source, source_path) {
            (Some(DiskSource::Snapshot(_)), Some(path)) => body = body.set_source_snapshot(path),
            (Some(DiskSource::Disk(_)), Some(path)) => body = body.set_source_disk(path),
            _ => {}
        }
        if let Some(iops) = params.iops {
            body = body.set_provisioned_iops(iops);
        }
        if let Some(t) = params.throughput {
            body = body.set_provisioned_throughput(t);
        }
        let what = format!("creating disk {name} in {}", location.name());
        tracing::info!(disk = %name, location = location.name(), gib, r#type = params.disk_type.as_str(), "creating disk");
        let done = match &location {
            Location::Zone(z) => {
                self.compute
                    .mutate(&what, |rid| {
                        self.compute
                            .disks
                            .insert()
                            .set_project(&p)
                            .set_zone(z)
                            .set_request_id(rid)
                            .set_body(body.clone())
                            .send()
                    })
                    .await
            }
            Location::Region(r) => {
                self.compute
                    .mutate(&what, |rid| {
                        self.compute
                            .region_disks
                            .insert()
                            .set_project(&p)
                            .set_region(r)
                            .set_request_id(rid)
                            .set_body(body.clone())
                            .send()
                    })
                    .await
            }
        };
        match done {
            Ok(()) => {}
            // Someone (a retry whose answer was lost) made it meanwhile.
            Err(e) if e.kind == Kind::AlreadyExists => {}
            Err(e) => return Err(e.into_error(&what)),
        }
        let raw = self.raw_disk(&location, &name).await?.ok_or_else(|| {
            Error::Unavailable(format!(
                "{what}: done, but the disk is not there yet; retry"
            ))
        })?;
        self.existing(raw, &location, &want)
    }

    /// A disk already under the name: the same volume when it matches the
    /// request, `ALREADY_EXISTS` when it does not.
    fn existing(&self, raw: model::Disk, location: &Location, want: &Wanted<'_>) -> Result<Disk> {
        let name = raw.name.clone().unwrap_or_default();
        let type_now = raw
            .r#type
            .as_deref()
            .map(last_segment)
            .unwrap_or("")
            .to_string();
        let size_now = raw.size_gb.unwrap_or(0).max(0) as u64;
        let status = raw.status.clone();
        let Some(found) = self.to_found(raw) else {
            return Err(Error::AlreadyExists(format!(
                "a disk named {name} exists in {} and was not created by this driver",
                location.name()
            )));
        };
        let differs = |what: String| {
            Err(Error::AlreadyExists(format!(
                "volume {:?} exists as {} with {what}",
                want.note.name, found.disk.id
            )))
        };
        if found.note.name != want.note.name {
            return differs(format!("another name ({:?})", found.note.name));
        }
        if size_now != want.gib {
            return differs(format!("{size_now} GiB, not {} GiB", want.gib));
        }
        if type_now != want.params.disk_type.as_str() {
            return differs(format!(
                "type {type_now}, not {}",
                want.params.disk_type.as_str()
            ));
        }
        if found.note.source != want.note.source {
            return differs(format!(
                "source {:?}, not {:?}",
                found.note.source, want.note.source
            ));
        }
        if found.note.options != want.note.options {
            return differs(format!(
                "options {:?}, not {:?}",
                found.note.options, want.note.options
            ));
        }
        if found.note.force_attach != want.note.force_attach {
            return differs(format!(
                "forced attaches {}, not {}",
                found.note.force_attach, want.note.force_attach
            ));
        }
        match status {
            Some(model::disk::Status::Ready) | None => Ok(found.disk),
            Some(model::disk::Status::Failed) => Err(Error::Internal(format!(
                "disk {} failed to be created; delete the volume and create it again",
                found.disk.id
            ))),
            Some(s) => Err(Error::Aborted(format!(
                "disk {} is {s:?}, not yet READY; retry",
                found.disk.id
            ))),
        }
    }

    pub(super) async fn delete(&self, id: &VolumeId) -> Result<()> {
        let Some(found) = self.find_disk(id).await? else {
            return Ok(());
        };
        if !found.disk.attached_to.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is attached to {:?}; unpublish it first",
                found.disk.attached_to
            )));
        }
        let what = format!("deleting disk {id}");
        let p = self.project();
        let name = id.disk();
        let done = match &found.location {
            Location::Zone(z) => {
                self.compute
                    .mutate(&what, |rid| {
                        self.compute
                            .disks
                            .delete()
                            .set_project(p)
                            .set_zone(z)
                            .set_disk(name)
                            .set_request_id(rid)
                            .send()
                    })
                    .await
            }
            Location::Region(r) => {
                self.compute
                    .mutate(&what, |rid| {
                        self.compute
                            .region_disks
                            .delete()
                            .set_project(p)
                            .set_region(r)
                            .set_disk(name)
                            .set_request_id(rid)
                            .send()
                    })
                    .await
            }
        };
        gone_is_done(done, &what)?;
        tracing::info!(volume = %id, "disk deleted");
        Ok(())
    }

    /// Every disk of ours in the project (zonal and regional), sorted by id.
    async fn all_disks(&self) -> Result<Vec<Disk>> {
        let what = "listing disks";
        let p = self.project();
        let filter = self.list_filter();
        let mut token = String::new();
        let mut disks = Vec::new();
        loop {
            let list = self
                .compute
                .call(what, || {
                    self.compute
                        .disks
                        .aggregated_list()
                        .set_project(p)
                        .set_filter(&filter)
                        .set_return_partial_success(true)
                        .set_page_token(&token)
                        .send()
                })
                .await
                .map_err(|e| e.into_error(what))?;
            if !list.unreachables.is_empty() {
                return Err(Error::Unavailable(format!(
                    "{what}: Compute Engine could not reach {:?}; retry",
                    list.unreachables
                )));
            }
            for scoped in list.items.into_values() {
                disks.extend(
                    scoped
                        .disks
                        .into_iter()
                        .filter_map(|raw| self.to_found(raw))
                        .map(|f| f.disk),
                );
            }
            match list.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) => token = t,
                None => break,
            }
        }
        disks.sort_by_key(|d| d.id.to_string());
        Ok(disks)
    }

    pub(super) async fn list(
        &self,
        token: Option<&str>,
        max: u32,
    ) -> Result<(Vec<Disk>, Option<String>)> {
        let start = check_token(token, |t| {
            t.parse::<VolumeId>().map(|id| id.backend()) == Ok(BackendKind::Gcp)
        })?;
        let all = self.all_disks().await?;
        Ok(paginate(
            all.into_iter().map(|d| (d.id.to_string(), d)),
            start,
            max,
        ))
    }

    pub(super) async fn resize(&self, id: &VolumeId, bytes: u64) -> Result<u64> {
        let found = self
            .find_disk(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        let now = found.disk.capacity_bytes / GIB;
        let gib = bytes.div_ceil(GIB);
        if gib < now {
            return Err(Error::InvalidArgument(format!(
                "volume {id} is {now} GiB; disks do not shrink (asked for {gib} GiB)"
            )));
        }
        if gib == now {
            return Ok(found.disk.capacity_bytes);
        }
        if gib > MAX_DISK_GIB {
            return Err(Error::OutOfRange(format!(
                "{gib} GiB is above the largest persistent disk ({MAX_DISK_GIB} GiB)"
            )));
        }
        // A Hyperdisk's provisioned performance has floors that grow with its
        // size: where the disk is below the new size's, `resize` alone is
        // refused, and `update` sets the size and the raised values at once
        // (as the PD CSI driver does).
        let disk_type = found
            .raw
            .r#type
            .as_deref()
            .map(last_segment)
            .and_then(params::DiskType::parse);
        if let Some(t) = disk_type
            && gib > t.max_gib()
        {
            return Err(Error::OutOfRange(format!(
                "{gib} GiB is above the largest {} disk ({} GiB)",
                t.as_str(),
                t.max_gib()
            )));
        }
        let raise = disk_type
            .map(|t| {
                t.performance_floor(gib)
                    .raise(found.raw.provisioned_iops, found.raw.provisioned_throughput)
            })
            .unwrap_or_default();
        let what = format!("resizing disk {id} to {gib} GiB");
        let done = if raise.is_empty() {
            self.resize_only(&found, gib, &what).await
        } else {
            tracing::info!(volume = %id, gib, iops = raise.iops, throughput = raise.throughput,
                "growing a Hyperdisk with its provisioned performance raised to the size's floor");
            self.update_size_and_performance(&found, gib, raise, &what)
                .await
        };
        done.map_err(|e| e.into_error(&what))?;
        let after = self
            .find_disk(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} vanished while resizing")))?;
        Ok(after.disk.capacity_bytes)
    }

    /// `disks.resize` / `regionDisks.resize` to `gib`.
    async fn resize_only(&self, found: &Found, gib: u64, what: &str) -> Result<(), ApiError> {
        let p = self.project();
        let name = found.disk.id.disk();
        match &found.location {
            Location::Zone(z) => {
                self.compute
                    .mutate(what, |rid| {
                        self.compute
                            .disks
                            .resize()
                            .set_project(p)
                            .set_zone(z)
                            .set_disk(name)
                            .set_request_id(rid)
                            .set_body(model::DisksResizeRequest::new().set_size_gb(gib as i64))
                            .send()
                    })
                    .await
            }
            Location::Region(r) => {
                self.compute
                    .mutate(what, |rid| {
                        self.compute
                            .region_disks
                            .resize()
                            .set_project(p)
                            .set_region(r)
                            .set_disk(name)
                            .set_request_id(rid)
                            .set_body(
                                model::RegionDisksResizeRequest::new().set_size_gb(gib as i64),
                            )
                            .send()
                    })
                    .await
            }
        }
    }

    /// `disks.update` / `regionDisks.update` of the size and the raised
    /// performance. The request's `updateMask` names the fields it sets (the
    /// API's field mask; the client crate sends only one value of the
    /// repeated `paths`, which the PD CSI driver uses instead).
    async fn update_size_and_performance(
        &self,
        found: &Found,
        gib: u64,
        raise: params::PerformanceFloor,
        what: &str,
    ) -> Result<(), ApiError> {
        let p = self.project();
        let name = found.disk.id.disk();
        let mut body = model::Disk::new().set_name(name).set_size_gb(gib as i64);
        let mut fields = vec!["sizeGb"];
        if let Some(iops) = raise.iops {
            body = body.set_provisioned_iops(iops);
            fields.push("provisionedIops");
        }
        if let Some(t) = raise.throughput {
            body = body.set_provisioned_throughput(t);
            fields.push("provisionedThroughput");
        }
        match &found.location {
            Location::Zone(z) => {
                let mut request = model::disks::UpdateRequest::new()
                    .set_project(p)
                    .set_zone(z)
                    .set_disk(name)
                    .set_body(body);
                request.update_mask = Some(Default::default());
                if let Some(mask) = request.update_mask.as_mut() {
                    mask.paths = fields.iter().map(|f| f.to_string()).collect();
                }
                self.compute
                    .mutate(what, |rid| {
                        self.compute
                            .disks
                            .update()
                            .with_request(request.clone().set_request_id(rid))
                            .send()
                    })
                    .await
            }
            Location::Region(r) => {
                let mut request = model::region_disks::UpdateRequest::new()
                    .set_project(p)
                    .set_region(r)
                    .set_disk(name)
                    .set_body(body);
                request.update_mask = Some(Default::default());
                if let Some(mask) = request.update_mask.as_mut() {
                    mask.paths = fields.iter().map(|f| f.to_string()).collect();
                }
                self.compute
                    .mutate(what, |rid| {
                        self.compute
                            .region_disks
                            .update()
                            .with_request(request.clone().set_request_id(rid))
                            .send()
                    })
                    .await
            }
        }
    }

    /// Records the usable size in the disk's [`LABEL_USABLE`]. `setLabels`
    /// replaces every label and must name the fingerprint of the labels it
    /// replaces, so a concurrent change is refused rather than lost: that is
    /// `Aborted`, and the CO's retry reads the labels again.
    pub(super) async fn set_usable(&self, id: &VolumeId, usable_bytes: u64) -> Result<()> {
        let found = self
            .find_disk(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        if found.disk.usable_bytes == Some(usable_bytes) {
            return Ok(());
        }
        let mut labels = found.raw.labels.clone();
        labels.insert(LABEL_USABLE.to_string(), usable_bytes.to_string());
        let what = format!("labelling disk {id} with its usable size");
        self.set_labels(id, &found, labels, &what).await
    }

    /// `setLabels` on a found disk: it replaces every label and must name the
    /// fingerprint of the labels it replaces, so a concurrent change is refused
    /// rather than lost (`Aborted`: the CO's retry reads the labels again).
    async fn set_labels(
        &self,
        id: &VolumeId,
        found: &Found,
        labels: HashMap<String, String>,
        what: &str,
    ) -> Result<()> {
        let fingerprint = found.raw.label_fingerprint.clone().unwrap_or_default();
        let p = self.project();
        let name = id.disk();
        let done = match &found.location {
            Location::Zone(z) => {
                let body = model::ZoneSetLabelsRequest::new()
                    .set_labels(labels)
                    .set_label_fingerprint(fingerprint);
                self.compute
                    .mutate(what, |rid| {
                        self.compute
                            .disks
                            .set_labels()
                            .set_project(p)
                            .set_zone(z)
                            .set_resource(name)
                            .set_request_id(rid)
                            .set_body(body.clone())
                            .send()
                    })
                    .await
            }
            Location::Region(r) => {
                let body = model::RegionSetLabelsRequest::new()
                    .set_labels(labels)
                    .set_label_fingerprint(fingerprint);
                self.compute
                    .mutate(what, |rid| {
                        self.compute
                            .region_disks
                            .set_labels()
                            .set_project(p)
                            .set_region(r)
                            .set_resource(name)
                            .set_request_id(rid)
                            .set_body(body.clone())
                            .send()
                    })
                    .await
            }
        };
        match done {
            Ok(()) => Ok(()),
            Err(e) if e.status == Some(412) => Err(Error::Aborted(format!(
                "{what}: its labels changed meanwhile ({}); retry",
                e.message
            ))),
            Err(e) if e.kind == super::compute::Kind::NotFound => {
                Err(Error::NotFound(format!("{what}: {}", e.message)))
            }
            Err(e) => Err(e.into_error(what)),
        }
    }

    // Snapshots.

    fn to_snapshot(&self, raw: &model::Snapshot) -> Option<Snapshot> {
        if !self.ours(&raw.labels) {
            return None;
        }
        let name = raw.name.clone()?;
        let note = Note::from_description(raw.description.as_deref())?;
        Some(Snapshot {
            id: SnapshotId::new(BackendKind::Gcp, SNAPSHOT_LOCATION, name).ok()?,
            name: note.name,
            source: note.volume?,
            size_bytes: raw.disk_size_gb.unwrap_or(0).max(0) as u64 * GIB,
            created_unix_nanos: raw
                .creation_timestamp
                .as_deref()
                .and_then(parse_timestamp)
                .unwrap_or(0),
            ready: raw.status == Some(model::snapshot::Status::Ready),
            options: note.options,
            usable_bytes: usable_of(&raw.labels),
            key_scope: note.key_scope,
        })
    }

    async fn raw_snapshot(&self, name: &str) -> Result<Option<model::Snapshot>> {
        let what = format!("getting snapshot {name}");
        let p = self.project();
        match self
            .compute
            .call(&what, || {
                self.compute
                    .snapshots
                    .get()
                    .set_project(p)
                    .set_snapshot(name)
                    .send()
            })
            .await
        {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind == Kind::NotFound => Ok(None),
            Err(e) => Err(e.into_error(&what)),
        }
    }

    pub(super) async fn find_snapshot(&self, name: &str) -> Result<Option<Snapshot>> {
        Ok(self
            .raw_snapshot(name)
            .await?
            .and_then(|raw| self.to_snapshot(&raw)))
    }

    fn existing_snapshot(
        &self,
        raw: &model::Snapshot,
        source: &VolumeId,
        co_name: &str,
    ) -> Result<Snapshot> {
        let name = raw.name.clone().unwrap_or_default();
        let snap = self.to_snapshot(raw).ok_or_else(|| {
            Error::AlreadyExists(format!(
                "a snapshot named {name} exists and was not created by this driver"
            ))
        })?;
        if snap.name != co_name || &snap.source != source {
            return Err(Error::AlreadyExists(format!(
                "snapshot {:?} exists as {} of volume {}, not of {source}",
                co_name, snap.id, snap.source
            )));
        }
        if raw.status == Some(model::snapshot::Status::Failed) {
            return Err(Error::Internal(format!(
                "snapshot {} failed; delete it and take it again",
                snap.id
            )));
        }
        Ok(snap)
    }

    pub(super) async fn snapshot(&self, source: &VolumeId, co_name: &str) -> Result<Snapshot> {
        let name = params::resource_name(co_name);
        if let Some(raw) = self.raw_snapshot(&name).await? {
            return self.existing_snapshot(&raw, source, co_name);
        }
        let found = self
            .find_disk(source)
            .await?
            .ok_or_else(|| Error::NotFound(format!("source volume {source} does not exist")))?;
        let p = self.project();
        let note = Note {
            name: co_name.to_string(),
            source: None,
            volume: Some(source.clone()),
            options: found.disk.options.clone(),
            force_attach: false,
            key_scope: Some(found.disk.scope()),
        };
        let body = model::Snapshot::new()
            .set_name(name.clone())
            .set_source_disk(found.path(p))
            .set_labels(self.labels(co_name, found.disk.usable_bytes))
            .set_description(note.to_description());
        let what = format!("creating snapshot {name} of {source}");
        tracing::info!(snapshot = %name, volume = %source, "creating snapshot");
        match self
            .compute
            .mutate(&what, |rid| {
                self.compute
                    .snapshots
                    .insert()
                    .set_project(p)
                    .set_request_id(rid)
                    .set_body(body.clone())
                    .send()
            })
            .await
        {
            Ok(()) => {}
            Err(e) if e.kind == Kind::AlreadyExists => {}
            Err(e) => return Err(e.into_error(&what)),
        }
        let raw = self.raw_snapshot(&name).await?.ok_or_else(|| {
            Error::Unavailable(format!(
                "{what}: done, but the snapshot is not there yet; retry"
            ))
        })?;
        self.existing_snapshot(&raw, source, co_name)
    }

    pub(super) async fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        if self.find_snapshot(id.snapshot()).await?.is_none() {
            return Ok(());
        }
        let what = format!("deleting snapshot {id}");
        let p = self.project();
        let done = self
            .compute
            .mutate(&what, |rid| {
                self.compute
                    .snapshots
                    .delete()
                    .set_project(p)
                    .set_snapshot(id.snapshot())
                    .set_request_id(rid)
                    .send()
            })
            .await;
        gone_is_done(done, &what)
    }

    async fn all_snapshots(&self) -> Result<Vec<Snapshot>> {
        let what = "listing snapshots";
        let p = self.project();
        let filter = self.list_filter();
        let mut token = String::new();
        let mut out = Vec::new();
        loop {
            let list = self
                .compute
                .call(what, || {
                    self.compute
                        .snapshots
                        .list()
                        .set_project(p)
                        .set_filter(&filter)
                        .set_return_partial_success(true)
                        .set_page_token(&token)
                        .send()
                })
                .await
                .map_err(|e| e.into_error(what))?;
            out.extend(list.items.iter().filter_map(|s| self.to_snapshot(s)));
            match list.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) => token = t,
                None => break,
            }
        }
        out.sort_by_key(|s| s.id.to_string());
        Ok(out)
    }

    pub(super) async fn snapshots_page(
        &self,
        source: Option<&VolumeId>,
        snapshot_id: Option<&SnapshotId>,
        token: Option<&str>,
        max: u32,
    ) -> Result<(Vec<Snapshot>, Option<String>)> {
        let start = check_token(token, |t| {
            t.parse::<SnapshotId>().map(|id| id.backend()) == Ok(BackendKind::Gcp)
        })?;
        let matches_source = |s: &Snapshot| source.is_none_or(|v| &s.source == v);
        let all = match snapshot_id {
            Some(id) if id.backend() == BackendKind::Gcp && id.location() == SNAPSHOT_LOCATION => {
                self.find_snapshot(id.snapshot())
                    .await?
                    .into_iter()
                    .collect()
            }
            Some(_) => Vec::new(),
            None => self.all_snapshots().await?,
        };
        let all: Vec<Snapshot> = all.into_iter().filter(matches_source).collect();
        Ok(paginate(
            all.into_iter().map(|s| (s.id.to_string(), s)),
            start,
            max,
        ))
    }
}

/// A resource's [`LABEL_USABLE`]; absent on resources from before it was kept.
fn usable_of(labels: &HashMap<String, String>) -> Option<u64> {
    labels.get(LABEL_USABLE)?.parse().ok()
}

/// What a CreateVolume asks for, to compare with a disk already there.
struct Wanted<'a> {
    note: &'a Note,
    gib: u64,
    params: &'a DiskParams,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_timestamp("2024-02-29T12:00:00.5+00:00"),
            Some(1_709_208_000_500_000_000)
        );
        assert_eq!(
            parse_timestamp("2024-02-29T05:00:00.000-07:00"),
            Some(1_709_208_000_000_000_000)
        );
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp("2024-13-01T00:00:00Z"), None);
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative("https://www.googleapis.com/compute/v1/projects/p/zones/z/disks/d"),
            "projects/p/zones/z/disks/d"
        );
        assert_eq!(
            relative("projects/p/zones/z/disks/d"),
            "projects/p/zones/z/disks/d"
        );
    }
}
