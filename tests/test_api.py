import deepsqueeze


def test_every_public_name_resolves():
    for name in deepsqueeze.__all__:
        assert getattr(deepsqueeze, name) is not None, name


def test_unknown_attribute_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no_such_thing"):
        deepsqueeze.no_such_thing  # noqa: B018


def test_errors_share_one_base():
    for name in ("ArtifactError", "RecipeError", "DataError", "ModelError", "UnsupportedLayerError"):
        assert issubclass(getattr(deepsqueeze, name), deepsqueeze.DeepsqueezeError)
def test_all_lists_exactly_the_exports():
    assert set(deepsqueeze.__all__) == set(deepsqueeze._EXPORTS) | {"__version__"}
