"""The host bridge leaves a long-lived server as it found it after a failed or cancelled run.

ComfyUI keeps a failed node's exception (and so its traceback) after the prompt; frames of
the run hang off that traceback. These tests run the bridge's guard without a server: a
small stand-in for ``comfy.model_management`` records what the guard asks of the host.
"""

import gc
import traceback
import weakref

import pytest


class _Held:
    """Stands for a model copy a training's frames hold."""


@pytest.fixture
def host(fake_comfy):
    from tsuika.nodes import _host

    return _host, fake_comfy


def _train_and_fail(refs, error):
    model_copy = _Held()  # a local of a frame deep in the run, as in the training loop
    refs.append(weakref.ref(model_copy))
    raise error


def test_a_failed_run_frees_what_its_frames_held_while_the_error_is_kept(host):
    _host, calls = host
    refs = []
    gc.disable()  # the point is to not depend on a collection
    try:
        # pytest holds the error, as ComfyUI does
        with pytest.raises(ValueError) as kept, _host.leave_host_as_found():
            _train_and_fail(refs, ValueError("train.optimizer: bad"))
        assert refs[0]() is None, "the failed run's frame still holds its model copy"
        # the error dialog's traceback text is still there
        assert "_train_and_fail" in "".join(traceback.format_tb(kept.value.__traceback__))
    finally:
        gc.enable()
    assert calls == ["unload_all_models", "soft_empty_cache"]


def test_a_cancel_turned_into_another_error_frees_the_original_frames(host):
    _host, calls = host
    refs = []
    gc.disable()
    try:
        with pytest.raises(RuntimeError) as kept, _host.leave_host_as_found():
            try:
                _train_and_fail(refs, KeyboardInterrupt())
            except KeyboardInterrupt:
                raise RuntimeError("Training cancelled.") from None
        assert isinstance(kept.value.__context__, KeyboardInterrupt)
        assert refs[0]() is None, "the cancelled run's frame still holds its model copy"
    finally:
        gc.enable()
    assert calls == ["unload_all_models", "soft_empty_cache"]


def test_a_finished_run_gives_memory_back_too(host):
    _host, calls = host
    with _host.leave_host_as_found():
        pass
    assert calls == ["unload_all_models", "soft_empty_cache"]
