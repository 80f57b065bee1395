"""Triton Python-backend model written by `trtforge export triton`: runs model.onnx (beside this
file) with onnxruntime on the CPU, inputs and outputs named as in config.pbtxt."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = Path(__file__).parent
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(here / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            try:
                results = self.session.run(self.outputs, feed)
            except Exception as e:  # the client gets the error, the model keeps serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
                continue
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=np.float32) if value.dtype == np.float16
                                       else value) for name, value in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
