"""Label conditioner: class indices, names, the null class for guidance and range errors."""

import pytest
import torch

from ldmkit.conditioning.labels import LabelConditioner


def test_labels_and_null_class():
    lc = LabelConditioner(3)
    cond = lc([0, 2, None, -1, 1])
    assert cond.labels.dtype == torch.int64 and cond.labels.tolist() == [0, 2, 3, 3, 1]
    assert cond.fields().keys() == {"labels"} and lc.null_label == 3
    assert lc(torch.tensor([2, -1, 0])).labels.tolist() == [2, 3, 0]
    assert lc(1).labels.tolist() == [1] and lc(None).labels.tolist() == [3]
    assert lc.null(4).labels.tolist() == [3, 3, 3, 3]
    assert lc([torch.tensor(1), 2.0]).labels.tolist() == [1, 2]


def test_class_names_as_labels():
    lc = LabelConditioner(2, ["top-left", "bottom-right"])
    assert lc(["bottom-right", "top-left", None]).labels.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="unknown class name 'middle'.*0=top-left, 1=bottom-right"):
        lc(["middle"])


@pytest.mark.parametrize("bad", [3, 7, -2, 1.5, True, "1", object()])
def test_out_of_range_names_the_valid_range(bad):
    lc = LabelConditioner(3, ["cat", "dog", "bird"])
    with pytest.raises(ValueError, match=r"0\.\.2, or -1 / None for no label; classes: 0=cat, 1=dog, 2=bird"):
        lc([0, bad])


def test_bad_constructions_and_tensors():
    with pytest.raises(ValueError, match="3 class names for 2 classes"):
        LabelConditioner(2, ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least one class"):
        LabelConditioner(0)
    lc = LabelConditioner(4)
    with pytest.raises(ValueError, match="1-D integers"):
        lc(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"0\.\.3"):
        lc(torch.tensor([4]))
    assert "classes:" not in str(pytest.raises(ValueError, lc, [9]).value)
