"""IMU-window datasets: a folder of TFRecord shards plus manifest.json, and the input pipeline.

One module per concept:
  schema.py         the record schema, Window, DataError
  tfrecord.py       TFRecord framing, CRC and TFRecordIndex (random access by record)
  example_codec.py  encode / decode one window as a tf.train.Example (fast canonical path)
  manifest.py       manifest.json: reading and checking it, publishing it
  tfds_metadata.py  the TFDS metadata (dataset_info.json, features.json, labels), a pure
                    function of the manifest, so tfds.builder_from_directory opens a dataset
  writer.py         DatasetWriter (shards + manifest, atomically)
  reader.py         SplitReader (records by global index) and load_split (a split in memory)
  loader.py         BatchIterator, the deterministic host-sharded training pipeline on grain
  mixture.py        MixtureIterator: several datasets drawn with weights into every batch

The names below are the package's public interface: `from primus_jax import data; data.X`.
"""

from primus_jax.data.example_codec import Example, decode_example, encode_example
from primus_jax.data.loader import BatchIterator, InputPipelineError, default_workers
from primus_jax.data.manifest import MANIFEST_NAME, publish_manifest, read_manifest
from primus_jax.data.mixture import MixtureIterator, MixtureSource, parse_mixture
from primus_jax.data.reader import load_split
from primus_jax.data.schema import CHANNELS, SCHEMA_VERSION, DataError, Window
from primus_jax.data.tfds_metadata import shard_file_name
from primus_jax.data.tfrecord import TFRecordIndex, frame_record
from primus_jax.data.writer import DatasetWriter

__all__ = ["BatchIterator", "CHANNELS", "DataError", "DatasetWriter", "Example",
           "InputPipelineError", "MANIFEST_NAME", "MixtureIterator", "MixtureSource", "default_workers",
           "SCHEMA_VERSION", "TFRecordIndex", "Window", "decode_example", "encode_example",
           "frame_record", "load_split", "parse_mixture", "publish_manifest", "read_manifest", "shard_file_name"]
