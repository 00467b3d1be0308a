//! The local backend's volumes: sparse image files in its data directory,
//! attached as loop devices by the node itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tonic::Status;

use super::DeviceLocator;
use crate::backend::LocalBackend;
use crate::csi::contract::LOCAL_IMAGE_PATH;
use crate::mount::loopdev;
use crate::volume::VolumeId;

/// The images of the local backend whose data directory is on this machine.
#[derive(Clone, Debug)]
pub struct LocalLocator {
    data_dir: PathBuf,
}

impl LocalLocator {
    pub fn new(data_dir: PathBuf) -> Self {
        LocalLocator { data_dir }
    }

    /// The image file of a volume: computed from the volume id, so nothing a
    /// request says can point the node at another file.
    pub fn image(&self, id: &VolumeId) -> PathBuf {
        LocalBackend::disk_image_path(&self.data_dir, id.disk())
    }

    /// The image to attach, after checking the publish context agrees with it
    /// and that it exists.
    fn checked_image(
        &self,
        id: &VolumeId,
        publish_context: &HashMap<String, String>,
    ) -> Result<PathBuf, Status> {
        let image = self.image(id);
        if let Some(given) = publish_context.get(LOCAL_IMAGE_PATH)
            && Path::new(given) != image
        {
            return Err(Status::invalid_argument(format!(
                "publish_context {LOCAL_IMAGE_PATH} {given:?} is not this volume's image"
            )));
        }
        if !image.exists() {
            return Err(Status::not_found(format!(
                "volume {id}: image {} does not exist",
                image.display()
            )));
        }
        Ok(image)
    }
}

#[tonic::async_trait]
impl DeviceLocator for LocalLocator {
    async fn locate(
        &self,
        id: &VolumeId,
        publish_context: &HashMap<String, String>,
    ) -> Result<PathBuf, Status> {
        let image = self.checked_image(id, publish_context)?;
        Ok(loopdev::attach(&image).await?)
    }

    /// Detaches the image's loop device.
    async fn release(&self, id: &VolumeId) -> Result<(), Status> {
        Ok(loopdev::detach(&self.image(id)).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn volume(disk: &str) -> VolumeId {
        format!("local:node-1:{disk}").parse().unwrap()
    }

    #[test]
    fn the_image_is_named_by_the_volume_id_and_must_exist() {
        let t = tempfile::tempdir().unwrap();
        let locator = LocalLocator::new(t.path().to_path_buf());
        let id = volume("disk-1");
        let image = locator.image(&id);
        assert!(image.starts_with(t.path()), "{}", image.display());
        let none = HashMap::new();
        let e = locator.checked_image(&id, &none).unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{}", e.message());

        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        std::fs::write(&image, b"").unwrap();
        assert_eq!(locator.checked_image(&id, &none).unwrap(), image);
        let same = HashMap::from([(
            LOCAL_IMAGE_PATH.to_string(),
            image.to_string_lossy().into_owned(),
        )]);
        assert_eq!(locator.checked_image(&id, &same).unwrap(), image);
    }

    #[test]
    fn a_publish_context_naming_another_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let locator = LocalLocator::new(t.path().to_path_buf());
        let id = volume("disk-1");
        let image = locator.image(&id);
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        std::fs::write(&image, b"").unwrap();
        let other = locator.image(&volume("disk-2"));
        let ctx = HashMap::from([(
            LOCAL_IMAGE_PATH.to_string(),
            other.to_string_lossy().into_owned(),
        )]);
        let e = locator.checked_image(&id, &ctx).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    }
}
