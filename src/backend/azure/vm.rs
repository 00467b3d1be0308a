//! Attach and detach: a VM's data-disk list read, changed and written back,
//! under a per-VM lock so that concurrent publishes to one node get distinct
//! LUNs and never race ARM's own one-update-at-a-time rule.
//!
//! A node id names either a standalone VM (also an instance of a Flexible scale
//! set, which is an ordinary VM), updated with `PATCH .../virtualMachines/{vm}`,
//! or, with `vmType: vmss`, an instance of a Uniform scale set named as IMDS
//! names it, `<scale set>_<instance id>`, updated with
//! `PUT .../virtualMachineScaleSets/{ss}/virtualMachines/{instance id}` (the
//! Compute API has no PATCH for scale-set VMs).

use std::sync::Arc;

use reqwest::Method;
use serde_json::{Value, json};

use super::arm::Conditional;
use super::config::VmType;
use super::disks::{Sku, attached_vms, disk_path, parse_arm_id, size_gib_of, sku_of, str_at};
use super::{AzureBackend, DISKS_API_VERSION, VM_API_VERSION};
use crate::backend::{Error, Result};
use crate::volume::VolumeId;

/// LUNs Azure numbers data disks with; a VM size allows a prefix of them.
const MAX_LUNS: u32 = 64;

/// Whether `name` can name a VM or a scale set: 1 to 64 letters, digits, `-`,
/// `_`, `.`.
fn vm_name_ok(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The VM a node id names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum NodeVm {
    /// `virtualMachines/{name}`.
    Standalone(String),
    /// `virtualMachineScaleSets/{scale_set}/virtualMachines/{instance_id}`.
    ScaleSetInstance {
        scale_set: String,
        instance_id: String,
    },
}

impl NodeVm {
    /// The VM `node` names under `vm_type`; `None` when it cannot name one.
    /// VM names cannot hold `_` while IMDS names a Uniform instance
    /// `<scale set>_<instance id>`, so the split at the last `_` is unambiguous.
    pub(super) fn parse(node: &str, vm_type: VmType) -> Option<NodeVm> {
        if !vm_name_ok(node) {
            return None;
        }
        if vm_type == VmType::Vmss
            && let Some((ss, id)) = node.rsplit_once('_')
            && !ss.is_empty()
            && !id.is_empty()
            && id.chars().all(|c| c.is_ascii_digit())
        {
            return Some(NodeVm::ScaleSetInstance {
                scale_set: ss.to_string(),
                instance_id: id.to_string(),
            });
        }
        Some(NodeVm::Standalone(node.to_string()))
    }

    fn path(&self, subscription: &str, rg: &str) -> String {
        let base = format!(
            "/subscriptions/{subscription}/resourceGroups/{rg}/providers/Microsoft.Compute"
        );
        match self {
            NodeVm::Standalone(name) => format!("{base}/virtualMachines/{name}"),
            NodeVm::ScaleSetInstance {
                scale_set,
                instance_id,
            } => {
                format!("{base}/virtualMachineScaleSets/{scale_set}/virtualMachines/{instance_id}")
            }
        }
    }

    /// The body that writes `entries` as the VM's data disks: a PATCH of a VM
    /// carries only them; a scale-set VM's PUT also carries the resource's
    /// required `location` (as cloud-provider-azure's scale-set update does).
    fn update(&self, vm: &Value, entries: &[Value]) -> (Method, Value) {
        let storage = json!({"storageProfile": {"dataDisks": entries}});
        match self {
            NodeVm::Standalone(_) => (Method::PATCH, json!({"properties": storage})),
            NodeVm::ScaleSetInstance { .. } => (
                Method::PUT,
                json!({"location": vm.get("location").cloned().unwrap_or(Value::Null), "properties": storage}),
            ),
        }
    }
}

fn data_disks(vm: &Value) -> Vec<Value> {
    vm.pointer("/properties/storageProfile/dataDisks")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Whether a data-disk entry is `disk_arm_id` (ARM ids compare case-insensitively).
fn is_disk(entry: &Value, disk_arm_id: &str) -> bool {
    str_at(entry, "/managedDisk/id").is_some_and(|id| id.eq_ignore_ascii_case(disk_arm_id))
}

fn lun_of(entry: &Value) -> Option<u32> {
    entry.get("lun").and_then(Value::as_u64).map(|l| l as u32)
}

fn detaching(entry: &Value) -> bool {
    entry.get("toBeDetached").and_then(Value::as_bool) == Some(true)
}

/// The lowest LUN no entry uses.
pub(super) fn free_lun(entries: &[Value]) -> Option<u32> {
    (0..MAX_LUNS).find(|l| !entries.iter().any(|e| lun_of(e) == Some(*l)))
}

/// How many times a data-disk update is tried: again after a 412 (the VM
/// changed since it was read), after dropping disks that no longer exist, and,
/// for a detach, once more with `ForceDetach`.
const UPDATE_ATTEMPTS: u32 = 4;

/// What writing a VM's data-disk list came to.
enum Written {
    /// Written; the VM as it is afterwards.
    Done(Value),
    /// Not written: the VM changed since it was read (412 to our `If-Match`).
    Stale,
    /// ARM answered 404 and the VM itself is gone.
    VmGone,
    /// ARM answered 404 while the VM exists: a disk in the list does not.
    Missing(String),
}

impl AzureBackend {
    fn vm_path(&self, vm: &NodeVm) -> String {
        vm.path(&self.subscription, &self.resource_group)
    }

    fn vm_lock(&self, vm: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(vm.to_ascii_lowercase()).or_default().clone()
    }

    /// Writes `entries` as the data disks of `vm` (as read), on condition that
    /// it has not changed since: its etag goes in `If-Match`, so that a
    /// concurrent writer (an old leader, another tool) is never overwritten.
    async fn write_disks(&self, target: &NodeVm, vm: &Value, entries: &[Value]) -> Result<Written> {
        let path = self.vm_path(target);
        let (method, body) = target.update(vm, entries);
        let etag = vm.get("etag").and_then(Value::as_str);
        match self
            .arm
            .write_if_match(method, &path, VM_API_VERSION, &body, etag)
            .await
        {
            Ok(Conditional::Done(v)) => Ok(Written::Done(v)),
            Ok(Conditional::Stale) => Ok(Written::Stale),
            // A 404 of the update is the VM's only when the VM is gone.
            Err(Error::NotFound(m)) => match self.arm.get(&path, VM_API_VERSION).await? {
                None => Ok(Written::VmGone),
                Some(_) => Ok(Written::Missing(m)),
            },
            Err(e) => Err(e),
        }
    }

    /// Removes the entries whose managed disk no longer exists (as
    /// cloud-provider-azure does before it retries an update that failed on
    /// one); `keep` is never removed. How many were removed.
    async fn drop_vanished(&self, entries: &mut Vec<Value>, keep: Option<&str>) -> Result<usize> {
        let mut gone = Vec::new();
        for entry in entries.iter() {
            let Some(id) = str_at(entry, "/managedDisk/id") else {
                continue;
            };
            if keep.is_some_and(|k| k.eq_ignore_ascii_case(id)) {
                continue;
            }
            // Only an id of the form we know goes into a request path.
            let Some((rg, name)) = parse_arm_id(id, "disks") else {
                continue;
            };
            let path = disk_path(&self.subscription, rg, name);
            if self.arm.get(&path, DISKS_API_VERSION).await?.is_none() {
                gone.push(id.to_string());
            }
        }
        entries.retain(|e| !gone.iter().any(|g| is_disk(e, g)));
        if !gone.is_empty() {
            tracing::warn!(disks = ?gone, "dropping data disks that no longer exist from the VM");
        }
        Ok(gone.len())
    }

    /// Attaches the disk to VM `node` and returns its LUN; the LUN it already
    /// has when attached there.
    pub(super) async fn attach_disk(&self, id: &VolumeId, node: &str) -> Result<u32> {
        let Some(target) = NodeVm::parse(node, self.vm_type) else {
            return Err(Error::NotFound(format!(
                "node {node:?} cannot name an Azure VM (1 to 64 letters, digits, '-', '_', '.')"
            )));
        };
        let disk_arm_id = self.disk_path(id);
        let disk = self
            .get_disk_json(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        let elsewhere: Vec<String> = attached_vms(&disk)
            .into_iter()
            .filter(|vm| !vm.eq_ignore_ascii_case(node))
            .collect();
        let shares = disk
            .pointer("/properties/maxShares")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        if !elsewhere.is_empty() && shares <= 1 {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is attached to {elsewhere:?}; unpublish it there first"
            )));
        }
        let sku = sku_of(&disk).unwrap_or(Sku::DEFAULT);
        let caching = sku.caching(size_gib_of(&disk));

        let lock = self.vm_lock(node);
        let _held = lock.lock().await;
        let path = self.vm_path(&target);
        let not_found = || {
            let hint = match (&target, self.vm_type) {
                (NodeVm::Standalone(n), VmType::Standard | VmType::VmssFlex) if n.contains('_') => {
                    " (a name <scale set>_<instance id> is an instance of a Uniform scale set: \
                     set vmType: vmss in the Azure configuration)"
                }
                _ => "",
            };
            Error::NotFound(format!(
                "node {node:?}: VM not found in resource group {}{hint}",
                self.resource_group
            ))
        };
        let mut drop_missing = false;
        for _ in 0..UPDATE_ATTEMPTS {
            let vm = self
                .arm
                .get(&path, VM_API_VERSION)
                .await?
                .ok_or_else(not_found)?;
            let mut entries = data_disks(&vm);
            if let Some(entry) = entries.iter().find(|e| is_disk(e, &disk_arm_id)) {
                if detaching(entry) {
                    return Err(Error::Aborted(format!(
                        "volume {id} is being detached from {node}; retry"
                    )));
                }
                if let Some(lun) = lun_of(entry) {
                    return Ok(lun);
                }
            }
            if drop_missing && self.drop_vanished(&mut entries, Some(&disk_arm_id)).await? == 0 {
                return Err(Error::NotFound(format!(
                    "attaching volume {id} to {node}: ARM names a disk that does not exist, \
                     and no disk listed on the VM is missing"
                )));
            }
            let lun = free_lun(&entries).ok_or_else(|| {
                Error::ResourceExhausted(format!("VM {node} has no free LUN left"))
            })?;
            entries.push(json!({
                "lun": lun,
                "name": id.disk(),
                "createOption": "Attach",
                "caching": caching,
                "managedDisk": {"id": disk_arm_id},
            }));
            match self.write_disks(&target, &vm, &entries).await? {
                Written::Done(updated) => {
                    let attached = data_disks(&updated)
                        .iter()
                        .find(|e| is_disk(e, &disk_arm_id))
                        .and_then(lun_of);
                    return match attached {
                        Some(l) => {
                            tracing::info!(volume = %id, %node, lun = l, caching, "disk attached");
                            Ok(l)
                        }
                        None => Err(Error::Internal(format!(
                            "VM {node} was updated but does not list volume {id} among its data disks"
                        ))),
                    };
                }
                Written::Stale => {
                    tracing::info!(%node, "the VM changed since it was read; reading it again");
                }
                Written::VmGone => return Err(not_found()),
                Written::Missing(m) => {
                    tracing::warn!(%node, error = %m, "a data disk of the VM is missing");
                    drop_missing = true;
                }
            }
        }
        Err(Error::Aborted(format!(
            "VM {node} kept changing while volume {id} was attached to it; retry"
        )))
    }

    /// Detaches the disk from VM `node`; a VM or disk that is gone, or a disk
    /// not attached there, is detached already. The VM is read back: a disk
    /// still listed after the update is detached again with `ForceDetach`.
    pub(super) async fn detach_disk(&self, id: &VolumeId, node: &str) -> Result<()> {
        let Some(target) = NodeVm::parse(node, self.vm_type) else {
            return Ok(());
        };
        let disk_arm_id = self.disk_path(id);
        let lock = self.vm_lock(node);
        let _held = lock.lock().await;
        let path = self.vm_path(&target);
        let mut force = false;
        let mut drop_missing = false;
        for _ in 0..UPDATE_ATTEMPTS {
            let Some(vm) = self.arm.get(&path, VM_API_VERSION).await? else {
                return Ok(());
            };
            let mut entries = data_disks(&vm);
            if !entries.iter().any(|e| is_disk(e, &disk_arm_id)) {
                tracing::info!(volume = %id, %node, "disk detached");
                return Ok(());
            }
            // The volume's own disk may be the missing one: then leaving it
            // out of the list is its detach.
            if drop_missing && self.drop_vanished(&mut entries, None).await? == 0 {
                return Err(Error::Unavailable(format!(
                    "detaching volume {id} from {node}: ARM names a disk that does not exist, \
                     and no disk listed on the VM is missing; retry"
                )));
            }
            if let Some(entry) = entries.iter_mut().find(|e| is_disk(e, &disk_arm_id)) {
                entry["toBeDetached"] = json!(true);
                if force {
                    entry["detachOption"] = json!("ForceDetach");
                }
            }
            match self.write_disks(&target, &vm, &entries).await? {
                Written::Done(updated) => {
                    if !data_disks(&updated)
                        .iter()
                        .any(|e| is_disk(e, &disk_arm_id))
                    {
                        tracing::info!(volume = %id, %node, force, "disk detached");
                        return Ok(());
                    }
                    tracing::warn!(
                        volume = %id, %node,
                        "the VM still lists the disk after its detach; forcing the detach"
                    );
                    force = true;
                }
                Written::Stale => {
                    tracing::info!(%node, "the VM changed since it was read; reading it again");
                }
                Written::VmGone => return Ok(()),
                Written::Missing(m) => {
                    tracing::warn!(%node, error = %m, "a data disk of the VM is missing");
                    drop_missing = true;
                }
            }
        }
        Err(Error::Unavailable(format!(
            "volume {id} is still attached to {node} after {UPDATE_ATTEMPTS} detach attempts \
             (the last one forced); retry"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_free_lun_is_taken() {
        assert_eq!(free_lun(&[]), Some(0));
        let used = [json!({"lun": 0}), json!({"lun": 2})];
        assert_eq!(free_lun(&used), Some(1));
        let full: Vec<Value> = (0..MAX_LUNS).map(|l| json!({"lun": l})).collect();
        assert_eq!(free_lun(&full), None);
    }

    #[test]
    fn vm_names() {
        assert!(vm_name_ok("aks-nodepool1-12345678-vms0"));
        assert!(!vm_name_ok(""));
        assert!(!vm_name_ok("a/b"));
        assert!(!vm_name_ok(&"x".repeat(65)));
    }

    #[test]
    fn node_ids_name_standalone_vms_or_uniform_instances() {
        let uniform = |ss: &str, id: &str| NodeVm::ScaleSetInstance {
            scale_set: ss.into(),
            instance_id: id.into(),
        };
        assert_eq!(
            NodeVm::parse("aks-nodepool1-123-vmss_12", VmType::Vmss),
            Some(uniform("aks-nodepool1-123-vmss", "12"))
        );
        // Not a Uniform instance name: a standalone VM, as in a mixed cluster.
        for name in ["vm-1", "a_b", "_3", "x_"] {
            assert_eq!(
                NodeVm::parse(name, VmType::Vmss),
                Some(NodeVm::Standalone(name.into())),
                "{name}"
            );
        }
        for t in [VmType::Standard, VmType::VmssFlex] {
            assert_eq!(
                NodeVm::parse("ss_0", t),
                Some(NodeVm::Standalone("ss_0".into()))
            );
        }
        assert_eq!(NodeVm::parse("a/b", VmType::Vmss), None);
        let p = uniform("ss", "3").path("s", "rg");
        assert_eq!(
            p,
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss/virtualMachines/3"
        );
        assert_eq!(
            super::super::disks::node_of_vm_id(&p.to_ascii_lowercase()).as_deref(),
            Some("ss_3")
        );
    }
}
