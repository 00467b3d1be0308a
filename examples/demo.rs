//! The client side of `hack/demo`: drives a running `cryptdisk-csi dev` through
//! a whole volume lifecycle over its unix socket, the way kubelet and the CSI
//! sidecars would, and prints how long each step took.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use cryptdisk_csi::client;
use cryptdisk_csi::config::Endpoint;
use cryptdisk_csi::proto::csi::controller_client::ControllerClient;
use cryptdisk_csi::proto::csi::identity_client::IdentityClient;
use cryptdisk_csi::proto::csi::node_client::NodeClient;
use cryptdisk_csi::proto::csi::volume_capability::access_mode::Mode;
use cryptdisk_csi::proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use cryptdisk_csi::proto::csi::*;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// The running driver's endpoint.
    #[arg(long)]
    endpoint: Endpoint,
    /// A separate controller's endpoint (`cryptdisk-csi controller` beside
    /// `cryptdisk-csi node`, as the chart deploys them); default: --endpoint.
    #[arg(long)]
    controller_endpoint: Option<Endpoint>,
    /// The driver's --data-dir (to show what the backing file holds).
    #[arg(long)]
    data_dir: PathBuf,
    /// The driver's --node-id.
    #[arg(long)]
    node_id: String,
    /// Where to put staging and target paths, as kubelet would.
    #[arg(long)]
    work_dir: PathBuf,
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Steps {
    started: Instant,
    count: usize,
}

impl Steps {
    async fn run<T>(
        &mut self,
        name: &str,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let t = Instant::now();
        let out = f.await?;
        self.count += 1;
        println!(
            "demo: {:<52} {:>9.1} ms",
            name,
            t.elapsed().as_secs_f64() * 1e3
        );
        Ok(out)
    }
}

struct Csi {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    node_id: String,
    work: PathBuf,
}

fn capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: vec!["noatime".into()],
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

impl Csi {
    fn staging(&self, v: &Volume) -> String {
        self.work
            .join(v.volume_id.replace(':', "_"))
            .join("staging")
            .display()
            .to_string()
    }

    fn target(&self, v: &Volume) -> PathBuf {
        self.work.join(v.volume_id.replace(':', "_")).join("target")
    }

    async fn controller_publish(&mut self, v: &Volume) -> Result<HashMap<String, String>> {
        Ok(self
            .controller
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                node_id: self.node_id.clone(),
                volume_capability: Some(capability()),
                ..Default::default()
            })
            .await?
            .into_inner()
            .publish_context)
    }

    async fn stage(&mut self, v: &Volume, ctx: &HashMap<String, String>) -> Result<()> {
        let staging = self.staging(v);
        std::fs::create_dir_all(&staging)?;
        self.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                publish_context: ctx.clone(),
                staging_target_path: staging,
                volume_capability: Some(capability()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    async fn publish(&mut self, v: &Volume, ctx: &HashMap<String, String>) -> Result<()> {
        self.node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                publish_context: ctx.clone(),
                staging_target_path: self.staging(v),
                target_path: self.target(v).display().to_string(),
                volume_capability: Some(capability()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    async fn unpublish(&mut self, v: &Volume) -> Result<()> {
        self.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                target_path: self.target(v).display().to_string(),
            })
            .await?;
        Ok(())
    }

    async fn unstage(&mut self, v: &Volume) -> Result<()> {
        self.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: self.staging(v),
            })
            .await?;
        Ok(())
    }

    async fn controller_unpublish(&mut self, v: &Volume) -> Result<()> {
        self.controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                node_id: self.node_id.clone(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }
}

fn create_request(name: &str, source: Option<VolumeContentSource>) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability()],
        volume_content_source: source,
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut steps = Steps {
        started: Instant::now(),
        count: 0,
    };
    let channel = steps
        .run("connect to the driver", async {
            Ok(client::connect(&args.endpoint, Duration::from_secs(10)).await?)
        })
        .await?;
    let info = IdentityClient::new(channel.clone())
        .get_plugin_info(GetPluginInfoRequest {})
        .await?
        .into_inner();
    println!("demo:   driver {} {}", info.name, info.vendor_version);
    let controller = match &args.controller_endpoint {
        Some(endpoint) => client::connect(endpoint, Duration::from_secs(10)).await?,
        None => channel.clone(),
    };
    let mut csi = Csi {
        controller: ControllerClient::new(controller),
        node: NodeClient::new(channel),
        node_id: args.node_id.clone(),
        work: args.work_dir.clone(),
    };
    let secret =
        b"cryptdisk demo: this sentence must never reach the disk in clear.\n".repeat(1024);

    let volume = steps
        .run("CreateVolume 1 GiB", async {
            Ok(csi
                .controller
                .create_volume(create_request("demo-data", None))
                .await?
                .into_inner()
                .volume
                .ok_or("no volume")?)
        })
        .await?;
    println!("demo:   volume {}", volume.volume_id);
    let ctx = steps
        .run("ControllerPublishVolume", csi.controller_publish(&volume))
        .await?;
    steps
        .run(
            "NodeStageVolume (format LUKS2, open, mkfs, mount)",
            csi.stage(&volume, &ctx),
        )
        .await?;
    steps
        .run("NodePublishVolume", csi.publish(&volume, &ctx))
        .await?;
    let file = csi.target(&volume).join("secret.txt");
    steps
        .run("write a 66 KiB file and fsync", async {
            use std::io::Write;
            let mut f = std::fs::File::create(&file)?;
            f.write_all(&secret)?;
            f.sync_all()?;
            Ok(())
        })
        .await?;
    steps
        .run("NodeUnpublishVolume", csi.unpublish(&volume))
        .await?;
    steps
        .run(
            "NodeUnstageVolume (unmount, close, detach)",
            csi.unstage(&volume),
        )
        .await?;
    let image = image_of(&args.data_dir, &volume.volume_id);
    let found = steps
        .run("scan the backing file for the plaintext", async {
            Ok(contains(&image, &secret[..64])?)
        })
        .await?;
    println!(
        "demo:   {} holds the plaintext: {}",
        image.display(),
        if found { "YES (bad)" } else { "no" }
    );
    steps
        .run(
            "NodeStageVolume again (key from the KMS)",
            csi.stage(&volume, &ctx),
        )
        .await?;
    steps
        .run("NodePublishVolume again", csi.publish(&volume, &ctx))
        .await?;
    let back = steps
        .run("read the file back", async { Ok(std::fs::read(&file)?) })
        .await?;
    println!("demo:   read back intact: {}", back == secret);
    steps
        .run("NodeUnpublishVolume", csi.unpublish(&volume))
        .await?;
    steps.run("NodeUnstageVolume", csi.unstage(&volume)).await?;
    steps
        .run(
            "ControllerUnpublishVolume",
            csi.controller_unpublish(&volume),
        )
        .await?;

    let snapshot = steps
        .run("CreateSnapshot", async {
            Ok(csi
                .controller
                .create_snapshot(CreateSnapshotRequest {
                    source_volume_id: volume.volume_id.clone(),
                    name: "demo-snapshot".into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .snapshot
                .ok_or("no snapshot")?)
        })
        .await?;
    let source = VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snapshot.snapshot_id.clone(),
            },
        )),
    };
    let restored = steps
        .run("CreateVolume from the snapshot", async {
            Ok(csi
                .controller
                .create_volume(create_request("demo-restored", Some(source)))
                .await?
                .into_inner()
                .volume
                .ok_or("no volume")?)
        })
        .await?;
    let rctx = steps
        .run(
            "ControllerPublishVolume (restored)",
            csi.controller_publish(&restored),
        )
        .await?;
    steps
        .run(
            "NodeStageVolume (restored: same header, same key)",
            csi.stage(&restored, &rctx),
        )
        .await?;
    steps
        .run(
            "NodePublishVolume (restored)",
            csi.publish(&restored, &rctx),
        )
        .await?;
    let restored_back = steps
        .run("read the file on the restored volume", async {
            Ok(std::fs::read(csi.target(&restored).join("secret.txt"))?)
        })
        .await?;
    println!("demo:   restored copy intact: {}", restored_back == secret);
    steps
        .run("NodeUnpublishVolume (restored)", csi.unpublish(&restored))
        .await?;
    steps
        .run("NodeUnstageVolume (restored)", csi.unstage(&restored))
        .await?;
    steps
        .run(
            "ControllerUnpublishVolume (restored)",
            csi.controller_unpublish(&restored),
        )
        .await?;
    steps
        .run("DeleteSnapshot, DeleteVolume x2", async {
            csi.controller
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: snapshot.snapshot_id.clone(),
                    ..Default::default()
                })
                .await?;
            for v in [&restored, &volume] {
                csi.controller
                    .delete_volume(DeleteVolumeRequest {
                        volume_id: v.volume_id.clone(),
                        ..Default::default()
                    })
                    .await?;
            }
            Ok(())
        })
        .await?;
    println!(
        "demo: {} steps in {:.1} s",
        steps.count,
        steps.started.elapsed().as_secs_f64()
    );
    if found || back != secret || restored_back != secret {
        return Err("the demo's checks failed".into());
    }
    println!("demo: OK");
    Ok(())
}

/// The image file behind a local volume id (`local:<node>:<disk>`).
fn image_of(data_dir: &Path, volume_id: &str) -> PathBuf {
    let disk = volume_id.rsplit(':').next().unwrap_or_default();
    data_dir.join("disks").join(format!("{disk}.img"))
}

fn contains(path: &Path, needle: &[u8]) -> std::io::Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        tail.extend_from_slice(&buf[..n]);
        if memchr::memmem::find(&tail, needle).is_some() {
            return Ok(true);
        }
        let keep = tail.len().min(needle.len() - 1);
        tail.drain(..tail.len() - keep);
    }
}
