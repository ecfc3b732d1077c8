"""The CAM op's argument list is written once in Python (ops.CAM_ARGS, CAM_BACKWARD_OUTS): the
registered C++ schemas and the fakes must agree with it, so that adding an argument fails here
until the schema, the struct and the Python side all carry it."""
import inspect

import pytest

from hycam_ext import ops

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason="no compiled hycam_ext._C")


def _schema(name):
    import torch
    return getattr(torch.ops.hycam, name).default._schema


def test_cam_forward_schema_is_cam_args():
    s = _schema("cam_forward")
    assert tuple(a.name for a in s.arguments) == ops.CAM_ARGS
    assert len(s.returns) == 1


def test_cam_backward_schema_is_go_then_cam_args():
    s = _schema("cam_backward")
    assert tuple(a.name for a in s.arguments) == ("go",) + ops.CAM_ARGS
    assert len(s.returns) == len(ops.CAM_BACKWARD_OUTS)


def test_fakes_take_the_same_arguments():
    assert tuple(inspect.signature(ops._cam_forward_fake).parameters) == ops.CAM_ARGS
    assert tuple(inspect.signature(ops._cam_backward_fake).parameters) == ("go",) + ops.CAM_ARGS


def test_every_gradient_has_a_forward_argument():
    assert set(ops.CAM_BACKWARD_OUTS) - {"main"} <= set(ops.CAM_TENSOR_ARGS)
