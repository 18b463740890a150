//! One manifest file's bytes into objects and problems: no filesystem here, so the fuzz
//! target `manifest` and the corpus replay test call exactly what the directory source calls.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize as _;
use serde_json::value::RawValue;

use crate::model::{NodeInfo, ObjectKey, ObjectRef, Objects, ServiceInfo, Slice};

/// How deeply `kind: List` documents may nest inside each other (kubectl never nests them;
/// the limit keeps a crafted file from exhausting the stack).
const MAX_LIST_DEPTH: usize = 8;

/// What one file holds.
#[derive(Debug, Default)]
pub struct FileObjects {
    pub objects: Objects,
    /// v1 Endpoints, mirrored into slices once all files are merged.
    pub endpoints: BTreeMap<ObjectKey, Arc<Endpoints>>,
    /// Problems with single objects (malformed, unnamed); the other objects are kept.
    pub problems: Vec<String>,
    /// Why the file as a whole cannot be used (not UTF-8, a document that does not parse):
    /// then the objects above are not used, and the file's last good version is kept.
    pub unusable: Option<String>,
    origins: BTreeMap<ObjectRef, PathBuf>,
}

/// Parses the contents of one file; `name` is used in problems and decides the syntax
/// (`*.json` as JSON, anything else as YAML).
pub fn parse_file(name: &Path, bytes: &[u8]) -> FileObjects {
    let mut reader = FileObjects::default();
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => {
            reader.unusable = Some(format!("{}: is not UTF-8: {error}", name.display()));
            return reader;
        }
    };
    if name.extension().is_some_and(|e| e == "json") {
        // JSON is YAML too, but serde_json reads it several times faster, and straight into
        // the typed objects: no tree of the whole file in between.
        for (index, document) in serde_json::Deserializer::from_str(text)
            .into_iter::<&RawValue>()
            .enumerate()
        {
            match document {
                Ok(raw) => reader.add_document(name, Document::Raw(raw), 0),
                Err(error) => return reader.unparsable(name, index, &error),
            }
        }
        return reader;
    }
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        // Straight into the JSON tree the typed objects are read from: one tree, not two.
        match serde_json::Value::deserialize(document) {
            Ok(serde_json::Value::Null) => {}
            Ok(value) => reader.add_document(name, Document::Tree(value), 0),
            // After a syntax error the YAML stream cannot be resynchronised.
            Err(error) => return reader.unparsable(name, index, &error),
        }
    }
    reader
}

impl FileObjects {
    /// Document `index` of `file` does not parse: the file cannot be used.
    fn unparsable(mut self, file: &Path, index: usize, error: &dyn std::fmt::Display) -> Self {
        self.unusable = Some(format!(
            "{}: document {} does not parse: {error}",
            file.display(),
            index + 1
        ));
        self
    }

    fn add_document(&mut self, file: &Path, document: Document<'_>, depth: usize) {
        let header = match document.header() {
            Ok(header) => header,
            Err(error) => {
                self.problems.push(format!(
                    "{}: a document is malformed: {error}; skipped",
                    file.display()
                ));
                return;
            }
        };
        let name = header.name.as_deref().unwrap_or("(no name)").to_owned();
        match (header.api_version.as_deref(), header.kind.as_deref()) {
            (_, Some(list)) if list == "List" || list.ends_with("List") => {
                if depth >= MAX_LIST_DEPTH {
                    self.problems.push(format!(
                        "{}: lists nested more than {MAX_LIST_DEPTH} deep; the inner ones are skipped",
                        file.display()
                    ));
                    return;
                }
                for item in document.items(header.items) {
                    self.add_document(file, item, depth + 1);
                }
            }
            (Some("v1"), Some("Service")) => {
                self.add(file, "Service", &name, document, |r, key, s: Service| {
                    let service = Arc::new(ServiceInfo::from(&s));
                    r.objects.services.insert(key, service).is_some()
                })
            }
            (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => self.add(
                file,
                "EndpointSlice",
                &name,
                document,
                |r, key, s: EndpointSlice| {
                    let slice = Arc::new(Slice::from(&s));
                    r.objects.endpoint_slices.insert(key, slice).is_some()
                },
            ),
            (Some("v1"), Some("Endpoints")) => self.add(
                file,
                "Endpoints",
                &name,
                document,
                |r, key, e: Endpoints| r.endpoints.insert(key, Arc::new(e)).is_some(),
            ),
            (Some("v1"), Some("Node")) => {
                self.add(file, "Node", &name, document, |r, key, n: Node| {
                    let node = Arc::new(NodeInfo::from(&n));
                    r.objects.nodes.insert(key.name, node).is_some()
                })
            }
            (None, _) | (_, None) => self.problems.push(format!(
                "{}: object {name} has no apiVersion or kind; skipped",
                file.display()
            )),
            // Deployments, ConfigMaps and the like often share a file with a Service.
            _ => {}
        }
    }

    /// Deserializes one object and stores it with `insert`, which says whether it replaced one.
    fn add<T: serde::de::DeserializeOwned + HasMeta>(
        &mut self,
        file: &Path,
        kind: &'static str,
        name: &str,
        document: Document<'_>,
        insert: impl FnOnce(&mut Self, ObjectKey, T) -> bool,
    ) {
        let mut object: T = match document.parse() {
            Ok(object) => object,
            Err(error) => {
                self.problems.push(format!(
                    "{}: {kind} {name} is malformed: {error}; skipped",
                    file.display()
                ));
                return;
            }
        };
        trim(object.meta_mut());
        if object.meta().name.as_deref().unwrap_or_default().is_empty() {
            self.problems.push(format!(
                "{}: a {kind} has no metadata.name; skipped",
                file.display()
            ));
            return;
        }
        let key = ObjectKey::of(object.meta());
        let reference = ObjectRef {
            kind,
            key: key.clone(),
        };
        if insert(self, key, object)
            && let Some(earlier) = self.origins.get(&reference)
        {
            self.problems.push(format!(
                "{}: {reference} is also defined in {}; the later file wins",
                file.display(),
                earlier.display()
            ));
        }
        self.origins.insert(reference, file.to_owned());
    }
}

/// One manifest document: a JSON tree (from YAML), or the raw text of a JSON document, which
/// is read straight into its typed object.
enum Document<'a> {
    Tree(serde_json::Value),
    Raw(&'a RawValue),
}

/// The fields that say what a document is.
#[derive(serde::Deserialize)]
struct Header<'a> {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(skip)]
    name: Option<String>,
    #[serde(default)]
    metadata: Option<HeaderMeta>,
    /// The items of a `kind: List` (raw documents only).
    #[serde(borrow, default)]
    items: Option<Vec<&'a RawValue>>,
}

#[derive(serde::Deserialize)]
struct HeaderMeta {
    name: Option<String>,
}

impl<'a> Document<'a> {
    fn header(&self) -> Result<Header<'a>, serde_json::Error> {
        match self {
            Document::Tree(json) => {
                let text = |key: &str| json.get(key).and_then(|v| v.as_str()).map(str::to_owned);
                Ok(Header {
                    api_version: text("apiVersion"),
                    kind: text("kind"),
                    name: json
                        .get("metadata")
                        .and_then(|m| m.get("name"))
                        .and_then(|n| n.as_str())
                        .map(str::to_owned),
                    metadata: None,
                    items: None,
                })
            }
            Document::Raw(raw) => {
                let mut header: Header<'a> = serde_json::from_str(raw.get())?;
                header.name = header.metadata.take().and_then(|m| m.name);
                Ok(header)
            }
        }
    }

    /// The items of a List document.
    fn items(self, raw_items: Option<Vec<&'a RawValue>>) -> Vec<Document<'a>> {
        match self {
            Document::Tree(mut json) => match json.get_mut("items").map(serde_json::Value::take) {
                Some(serde_json::Value::Array(items)) => {
                    items.into_iter().map(Document::Tree).collect()
                }
                _ => Vec::new(),
            },
            Document::Raw(_) => raw_items
                .unwrap_or_default()
                .into_iter()
                .map(Document::Raw)
                .collect(),
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(self) -> Result<T, serde_json::Error> {
        match self {
            Document::Tree(json) => serde_json::from_value(json),
            Document::Raw(raw) => serde_json::from_str(raw.get()),
        }
    }
}

trait HasMeta {
    fn meta(&self) -> &ObjectMeta;
    fn meta_mut(&mut self) -> &mut ObjectMeta;
}

macro_rules! has_meta {
    ($($t:ty),*) => {$(
        impl HasMeta for $t {
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    )*};
}
has_meta!(Service, EndpointSlice, Endpoints, Node);

/// `kubectl get -o yaml` output carries managedFields and often a copy of the whole object in
/// the last-applied annotation; neither is read, and together they can triple what is kept.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn trim(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove(LAST_APPLIED);
    }
}
