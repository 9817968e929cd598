"""`transformers`' own common tests (`ModelTesterMixin`, `ConfigTester`, `ImageProcessingTestMixin`,
`PostProcessSemanticSegmentationTestMixin`) run against `StepModel` and `StepForSemanticSegmentation` in four
configurations, written the way an in-tree `tests/models/<model>/test_modeling_<model>.py` is.

The upstream test files come from the sdist of the installed `transformers` version (`tests/transformers_upstream.py`
fetches it with pip). Without it these tests skip and say why; in CI (`CI=true`) they fail instead. Every upstream
test that cannot apply to STEP is listed below with the reason.
"""

import functools
import os
import re
import unittest
from unittest import mock

import pytest
import torch

from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from step_hf import StepConfig, StepForSemanticSegmentation, StepImageProcessor, StepModel
from step_hf.superpatch import superpatch_targets_from_labels

from .conftest import tiny_config
from .transformers_upstream import UpstreamTestsUnavailable, install_upstream_tests

try:
    install_upstream_tests()
except UpstreamTestsUnavailable as unavailable:
    if os.environ.get("CI") == "true":  # CI reaches PyPI: a missing sdist is a failure there, not a skip
        raise
    pytest.skip(str(unavailable), allow_module_level=True)

from tests.test_configuration_common import ConfigTester  # noqa: E402
from tests.test_image_processing_common import (  # noqa: E402
    ImageProcessingTester,
    ImageProcessingTestMixin,
    PostProcessSemanticSegmentationTestMixin,
)
from tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor  # noqa: E402

# Inputs are 80 x 64 pixels: a 5 x 4 patch grid, where superpatches of side 2 and 4 fit whole in part of the grid,
# so that a partition mixes sizes (the token-sharing configurations use these two sizes: a policy level for a side
# the grid cannot hold never runs, and the common tests want a gradient in every parameter).
HEIGHT, WIDTH = 80, 64

# The four configurations. At initialisation the policy's block probabilities lie within a few hundredths of 0.5
# (its heads start near zero), so thresholds of 0.4 (side 2: shared) and 0.6 (side 4: not shared) give every
# freshly built model the same mixed partition: four 2 x 2 supertokens and the last row's four patches, 8 tokens.
# Halting: an exit threshold below 1 / num_labels makes every token confident, and the keep rule keeps one per
# predicted class, so tokens do leave after block 1. Static: a token budget and a fixed count at the exit.
CONFIGURATIONS = {
    "dense": dict(partition_source="dense"),
    "policy": dict(partition_source="policy", superpatch_sizes=[2, 4], policy_thresholds=[0.4, 0.6]),
    "halting": dict(exit_layers=[1], halting=True, exit_thresholds=[0.2], exit_keep_topk_per_class=1),
    "static": dict(partition_source="policy", superpatch_sizes=[2, 4], token_budget=14, halting=True, exit_layers=[1],
                   exit_keep_tokens=[6]),
}
TOKENS = {"dense": 20, "policy": 8, "halting": 20, "static": 14}  # tokens per image of each, before any exit

# Upstream tests that cannot apply to STEP, with the reason. Not listed: tests that skip themselves, saying why (no
# accelerator, no flash-attention, `inputs_embeds`, token embeddings to resize, a text, audio or composite model's
# feature), and `test_model_get_set_embeddings`, which `StepModelTestBase` replaces as in-tree vision models do.
NOT_APPLICABLE_IMAGE_PROCESSING = {
    "test_backends_equivalence": "loads a COCO image from the Hub (tests never reach the Hub), and STEP has one "
    "processor class (PIL and NumPy) for both backend names.",
    "test_pil_can_load_without_torchvision": "imports the processor from `transformers.models.<model type>`, where "
    "in-tree models live; STEP's processor (step_hf) is PIL-based, and every test here runs without torchvision.",
    "test_pil_can_run_without_torchvision": "loads the saved processor in a new Python process that never imported "
    "step_hf, which only in-tree model types can do (an out-of-tree processor loads there with trust_remote_code=True, "
    "tested in tests/test_auto_and_pipeline.py); every test here runs without torchvision anyway.",
    "test_new_models_require_torchvision_backend": "asks in-tree models added after 2025-09 for a torchvision "
    "backend; torchvision does not import beside the CPU torch STEP is tested with, so STEP's one processor is "
    "PIL-based and registered under both backend names.",
}

# Upstream tests deselected by default (`slow`; CI runs them): the eager-against-SDPA comparison's padding-side and
# attention-mask variants. STEP's forward takes no `attention_mask`, so they repeat the same comparison; one
# variant per dtype and kernel choice stays in the default run, and the one with `output_attentions`.
SLOW_MODEL = re.compile(r"test_eager_matches_sdpa_inference_\d+_.*(pad_right|no_attn_mask).*")


def not_applicable(reasons: dict[str, str]):
    """Class decorator: each listed upstream test skips with its reason (in-tree files override them the same
    way). A listed name the installed version does not have is left out."""

    def apply(cls):
        for name, reason in reasons.items():
            if hasattr(cls, name):
                setattr(cls, name, unittest.skip(reason)(lambda self: None))
        return cls

    return apply


def slow(pattern: re.Pattern):
    """Class decorator: the upstream tests whose names match are marked `slow` (in this class only)."""

    def apply(cls):
        for name in dir(cls):
            if pattern.fullmatch(name):
                upstream = getattr(cls, name)
                setattr(cls, name, pytest.mark.slow(functools.wraps(upstream)(lambda self, test=upstream: test(self))))
        return cls

    return apply


class StepModelTester:
    """Builds the configuration and inputs the common tests use, as `<Model>ModelTester` classes do."""

    def __init__(self, parent, configuration: str, batch_size: int = 2, is_training: bool = True):
        self.parent = parent
        self.configuration = configuration
        self.batch_size = batch_size
        self.is_training = is_training
        config = self.get_config()
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = config.num_attention_heads
        self.num_labels = config.num_labels
        self.num_channels = config.num_channels
        self.patch_size = config.patch_size
        self.image_size = HEIGHT  # the stored position grid is the input's (80 x 64)
        self.seq_length = 1 + TOKENS[configuration]  # the class token, then every image's tokens

    def get_config(self) -> StepConfig:
        return tiny_config(image_size=[HEIGHT, WIDTH], **CONFIGURATIONS[self.configuration])

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, HEIGHT, WIDTH])
        labels = ids_tensor([self.batch_size, HEIGHT, WIDTH], self.num_labels)
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def create_and_check_model(self, config, pixel_values, labels):
        """The shapes, and that each configuration does what its name says: the partition's token count, and
        tokens leaving at the exit where halting is on."""
        model = StepModel(config).eval()
        with torch.no_grad():
            result = model(pixel_values)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        tokens = TOKENS[self.configuration]
        self.parent.assertEqual(result.token_counts.tolist(), [tokens] * self.batch_size)
        reached_the_end = (result.sequence_mask.sum(1) - 1).tolist()
        if config.exit_keep_tokens:
            self.parent.assertEqual(reached_the_end, config.exit_keep_tokens * self.batch_size)
        elif config.halting:  # the keep rule keeps one token per predicted class
            self.parent.assertTrue(all(count <= self.num_labels for count in reached_the_end), reached_the_end)
        else:
            self.parent.assertEqual(reached_the_end, [tokens] * self.batch_size)

    def create_and_check_for_semantic_segmentation(self, config, pixel_values, labels):
        model = StepForSemanticSegmentation(config).eval()
        with torch.no_grad():
            result = model(pixel_values, labels=labels)
        grid = (HEIGHT // self.patch_size, WIDTH // self.patch_size)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels, *grid))
        self.parent.assertTrue(torch.isfinite(result.loss))


class StepModelTestBase(ModelTesterMixin):
    """The common model tests for one configuration (`configuration`, set by each subclass)."""

    configuration: str
    all_model_classes = (StepModel, StepForSemanticSegmentation)
    test_resize_embeddings = False  # patch embeddings (a convolution), not a token table
    # Upstream dates a model by the copyright line of its config file, which STEP's lacks, and would skip as for
    # models added before 2023: STEP's `_init_weights` covers every weight, so the test runs.
    test_can_init_all_missing_weights_before_2023 = True

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The common tests tell a base model (it has no loss) by its entry here, which an in-tree model has;
        # `import step_hf` registers `StepModel` with `AutoModel` only.
        entry = mock.patch.dict(MODEL_MAPPING_NAMES, {StepConfig.model_type: StepModel.__name__})
        entry.start()
        cls.addClassCleanup(entry.stop)

    def setUp(self):
        self.model_tester = StepModelTester(self, self.configuration)
        # Dense partitions never run the policy, so its parameters get no gradient there (they learn in the
        # policy-stage training, from superpatch targets); the other configurations train every parameter.
        self.test_all_params_have_gradient = self.model_tester.get_config().partition_source != "dense"
        self.config_tester = ConfigTester(self, config_class=StepConfig, has_text_modality=False, hidden_size=37,
                                          num_attention_heads=1)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """Upstream's, plus the superpatch targets that STEP trains its policy on: the image processor emits them
        beside the labels."""
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if "labels" in inputs_dict:
            config = self.model_tester.get_config()
            inputs_dict["superpatch_targets"] = superpatch_targets_from_labels(
                inputs_dict["labels"], config.shared_sizes, config.patch_size
            )
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_semantic_segmentation(self):
        self.model_tester.create_and_check_for_semantic_segmentation(*self.model_tester.prepare_config_and_inputs())

    def test_model_get_set_embeddings(self):
        """Upstream's version expects a token table (`nn.Embedding`) to swap; STEP's input embedding is its patch
        embedding, a convolution that turns images into tokens, as in `transformers`' ViT, and it has no output
        embeddings."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings().proj, torch.nn.Conv2d)
            self.assertIsNone(model.get_output_embeddings())


@slow(SLOW_MODEL)
class StepDenseModelTest(StepModelTestBase, unittest.TestCase):
    configuration = "dense"


@slow(SLOW_MODEL)
class StepPolicyModelTest(StepModelTestBase, unittest.TestCase):
    configuration = "policy"


@slow(SLOW_MODEL)
class StepHaltingModelTest(StepModelTestBase, unittest.TestCase):
    configuration = "halting"


@slow(SLOW_MODEL)
class StepStaticModelTest(StepModelTestBase, unittest.TestCase):
    configuration = "static"


class StepImageProcessingTester(ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("batch_size", 3)
        kwargs.setdefault("min_resolution", 30)
        kwargs.setdefault("max_resolution", 120)
        kwargs.setdefault("size", {"height": 64, "width": 48})
        kwargs.setdefault("do_normalize", True)
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        kwargs.setdefault("num_labels", 4)
        super().__init__(parent, **kwargs)

    def _get_image_processing_classes(self) -> dict:
        # Upstream reads the classes of the model type named by the test file's folder (tests/models/<type>/).
        return {"pil": StepImageProcessor}


@not_applicable(NOT_APPLICABLE_IMAGE_PROCESSING)
class StepImageProcessingTest(ImageProcessingTestMixin, PostProcessSemanticSegmentationTestMixin, unittest.TestCase):
    image_processor_tester_class = StepImageProcessingTester
