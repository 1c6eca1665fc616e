"""Run as a separate process beside a Label Studio server, by a Python with the Label Studio SDK
(this project's, where the ``review`` extra installs it): through the SDK, create a project
with the exported config, connect the images folder as local-files storage (Label Studio serves
/data/local-files/ only from a connected folder), import the exported tasks, read every task's
predictions back through the API and decode each brush region with the SDK's converter.

    python label_studio_client.py URL TOKEN EXPORT_DIR IMAGES_DIR OUT_DIR

writes OUT_DIR/read_back.json (per task, in import order: file name, model version, score,
regions and the .npy of each decoded mask) and OUT_DIR/<task>-<region>.npy.
"""

import json
import sys
from pathlib import Path

import numpy as np
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.converter.brush import decode_rle


def main(url: str, token: str, export_dir: Path, images: Path, out: Path) -> None:
    client = LabelStudio(base_url=url, api_key=token)
    config = (export_dir / "config.xml").read_text()
    project = client.projects.create(title="usam review", label_config=config)
    client.import_storage.local.create(project=project.id, path=str(images), title="images")
    tasks = json.loads((export_dir / "tasks.json").read_text())
    client.projects.import_tasks(id=project.id, request=tasks)
    read_back = []
    for task in sorted(client.tasks.list(project=project.id), key=lambda t: t.id):
        predictions = list(client.predictions.list(task=task.id))
        assert len(predictions) == 1, predictions
        prediction = predictions[0]
        regions = []
        for index, region in enumerate(prediction.result):
            entry = {"type": region["type"], "id": region["id"], "score": region.get("score")}
            if region["type"] == "brushlabels":
                shape = (region["original_height"], region["original_width"], 4)
                mask = decode_rle(region["value"]["rle"]).reshape(shape)[..., 3] == 255
                entry["npy"] = f"{task.id}-{index}.npy"
                entry["label"] = region["value"]["brushlabels"][0]
                np.save(out / entry["npy"], mask)
            else:
                entry["label"] = region["value"]["polygonlabels"][0]
                entry["points"] = region["value"]["points"]
            regions.append(entry)
        read_back.append(
            {
                "file_name": task.data["file_name"],
                "image": task.data["image"],
                "model_version": prediction.model_version,
                "score": prediction.score,
                "regions": regions,
            }
        )
    (out / "read_back.json").write_text(json.dumps(read_back))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
