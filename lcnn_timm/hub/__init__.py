"""Publishing to the Hugging Face Hub: timm-layout repositories, generated model cards, checked pretrained loading."""
from .card import Metric, metrics_from_results, regenerate_cards, render_card, render_card_for_folder
from .push import (
    HubAuthError,
    HubError,
    check_state_dict,
    create_model_from_checkpoint,
    load_checkpoint,
    load_pretrained,
    read_weights,
    push_checkpoint,
    resolve_token,
    upload_repo_folder,
    verify_repo_folder,
    write_repo_folder,
)
