"""Class names of the datasets published Segmenter models were trained on, in their label-id order (as the datasets'
documentation and mmsegmentation's dataset classes list them). Used to fill `id2label` when converting."""

ADE20K = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

CITYSCAPES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

# The 59 classes of Pascal Context; models trained with 60 classes put "background" first.
PASCAL_CONTEXT = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
    "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door",
    "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain",
    "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)

DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "ade20k": ADE20K, "cityscapes": CITYSCAPES, "pascal_context": PASCAL_CONTEXT,
}


def dataset_id2label(dataset: str, num_labels: int) -> dict[int, str]:
    """`id2label` of a dataset for a model with `num_labels` classes; Pascal Context's 60-class models have the
    background at 0. A count that fits neither is refused, naming both."""
    if dataset not in DATASET_CLASSES:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {sorted(DATASET_CLASSES)}.")
    names = DATASET_CLASSES[dataset]
    if dataset == "pascal_context" and num_labels == len(names) + 1:
        names = ("background", *names)
    if len(names) != num_labels:
        raise ValueError(f"The checkpoint has {num_labels} classes but {dataset} has {len(names)}.")
    return dict(enumerate(names))
