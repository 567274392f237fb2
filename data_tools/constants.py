"""Label codes and normalisation constants: facts used by data, models and inference."""

ATYPICAL, NORMAL, UNLABELLED = 1, 0, -1
NOT_IN_CV = -1  # fold value of rows outside the CV pool (e.g. a test set)
LABEL_NAMES = {ATYPICAL: "atypical", NORMAL: "normal", UNLABELLED: "unlabelled"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Lunit DINO (Kang et al. 2023); the hub mirror's config carries ImageNet's, so set these explicitly.
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
# H-optimus-0's model card (Bioptimus)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
