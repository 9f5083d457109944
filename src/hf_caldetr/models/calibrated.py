"""Cal-DETR on any registered DETR: the method as a wrapper of the parent's own loss function.

Every transformers DETR hands its loss function (``self.loss_function``) the final layer's logits and boxes and,
for the auxiliary losses, every decoder layer's logits. :class:`CalibratedDetectorMixin` puts
:func:`calibrated_loss` in front of the installed parent's loss, which

1. takes every decoder layer's class logits of the matching queries from those arguments (RT-DETR and its
   descendants: denoising queries, which come first, are left out; DETR without ``auxiliary_loss``: from a forward
   hook, see :meth:`CalibratedDetectorMixin._record_layer_output`),
2. computes their uncertainty ``U = Var_l(Z)`` and hands the parent's loss the modulated final logits
   (``config.uncertainty_modulation``) in place of the raw ones; the auxiliary layers keep their raw logits,
3. calls the parent's own loss function, unchanged,
4. when ``config.num_boxes_normalization == "global"``, rescales the box-normalised losses from the parent's
   normaliser to the whole batch's (a no-op in one process),
5. adds ``logit_mixing_loss_coefficient * L_R``, the logit-mixing loss of the final layer's Hungarian-matched
   queries (the matches the parent's loss computed, kept by :class:`FinalLayerMatches`; the parent's matcher is
   run again only where none could be kept), reported unweighted as ``loss_dict["loss_logit_mixing"]``.

The forward is the parent's: its outputs are the stock ones (``logits`` raw unless ``modulate_at_inference``).
Every layer's logits and the uncertainty of any output: :func:`hf_caldetr.families.decoder_layer_logits` and
:func:`hf_caldetr.method.logit_uncertainty`.
"""

from __future__ import annotations

import inspect
import re
from functools import lru_cache, partial

import torch
from transformers.loss.loss_utils import LOSS_MAPPING

from ..method import logit_uncertainty, modulate_logits
from ..distributed import num_boxes_across_processes, world_size
from ..families import MODEL_FAMILIES, ModelFamily
from .criterion import sigmoid_logit_mixing_loss, softmax_logit_mixing_loss


@lru_cache(maxsize=None)
def stock_loss_function(parent: type):
    """The loss function transformers gives ``parent`` (its rule: the class name, else the longest-known suffix)."""
    if parent.__name__ in LOSS_MAPPING:
        return LOSS_MAPPING[parent.__name__]
    found = re.findall(f"({'|'.join(LOSS_MAPPING)})", parent.__name__)
    if not found:
        raise ValueError(f"transformers has no loss function for {parent.__name__}")
    return LOSS_MAPPING[found[0]]


@lru_cache(maxsize=64)
def _parameter_names(function) -> tuple[str, ...]:
    """The names of ``function``'s parameters that a positional argument fills."""
    names = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.VAR_POSITIONAL):
            raise TypeError(f"the loss function {function!r} takes positional-only or *args parameters; a Cal model "
                            "reads and replaces the loss function's arguments by name (logits, labels, pred_boxes, "
                            "...): give it a function whose parameters are named as transformers' own")
        if parameter.kind is parameter.POSITIONAL_OR_KEYWORD:
            names.append(parameter.name)
    return tuple(names)


def _bind(function, args: tuple, kwargs: dict) -> dict:
    """``function``'s arguments by name, for a call ``function(**arguments)``: what ``inspect.Signature.bind`` gives
    for these parameters, from a cached list of names (the loss is called every step; ``bind`` costs tens of
    microseconds)."""
    names = _parameter_names(function)
    if len(args) > len(names):
        raise TypeError(f"{function!r} takes {len(names)} positional arguments but {len(args)} were given")
    arguments = dict(zip(names, args))
    for name, value in kwargs.items():
        if name in arguments:
            raise TypeError(f"{function!r} got multiple values for argument {name!r}")
        arguments[name] = value
    return arguments


def _num_denoising(arguments: dict) -> int:
    meta = arguments.get("denoising_meta_values")
    return int(meta["dn_num_split"][0]) if meta is not None else 0


def matching_layer_logits(model, family: ModelFamily, arguments: dict) -> torch.Tensor:
    """Every decoder layer's class logits of the matching queries, ``[B, L, Q, C]``, from the arguments of a loss
    call. The final layer is ``arguments["logits"]`` itself (what the parent's final-layer loss sees)."""
    num_denoising = _num_denoising(arguments)
    final = arguments["logits"][:, num_denoising:]
    layers = arguments.get("outputs_class")
    if layers is not None:
        if family.layers_first:
            earlier = layers[family.pre_layers:-1].transpose(0, 1)
        else:
            earlier = layers[:, family.pre_layers:-1]
        earlier = earlier[:, :, num_denoising:]
    elif family.recorded_layers is not None:
        earlier = family.recorded_layer_logits(model, model._recorded_layer_outputs())
    else:
        raise ValueError(f"{type(model).__name__}: the parent's loss received no per-layer logits")
    return torch.cat([earlier, final.unsqueeze(1)], dim=1)


def _rescale_to_global_normaliser(family: ModelFamily, config, loss, loss_dict: dict, targets: list[dict],
                                  global_boxes: float, device):
    """The parent's box-normalised losses divided by the whole batch's normaliser instead of its own."""
    if family.stock_num_boxes is None:  # the parent's normaliser is already the whole batch's
        return loss, loss_dict
    factor = family.stock_num_boxes(targets) / global_boxes
    if factor == 1.0:
        return loss, loss_dict
    prefixes = family.unnormalised_losses
    prefixes = tuple(prefixes(config) if callable(prefixes) else prefixes)
    unnormalised = [key for key in loss_dict if key.startswith(prefixes or ("\0",))]
    fixed = sum((loss_dict[key] for key in unnormalised), torch.zeros((), device=device))
    loss = fixed + factor * (loss - fixed)
    rescaled = {key: value if key in unnormalised or key.startswith("cardinality") else value * factor
                for key, value in loss_dict.items()}
    return loss, rescaled


class FinalLayerMatches:
    """Keeps the Hungarian matches the parent's loss computes for the final layer, so the mixing loss need not
    match again (on CPU the matching is a third of the mixing loss's cost).

    Used as a context manager around the parent's loss call: a global module forward hook, registered for that call
    only, looks at every call of the family's matcher class and keeps the output of the first one whose
    predictions equal the final layer's (``torch.equal`` on logits and boxes) with the same extra arguments (group
    DETR's group count). The matching is a deterministic function of those, so the kept matches are exactly what
    running the matcher again would give. Nothing kept (a parent that matches otherwise): :attr:`indices` is None
    and the caller runs the matcher itself.
    """

    def __init__(self, matcher_class: type, logits: torch.Tensor, pred_boxes: torch.Tensor, extra: tuple = ()):
        self.matcher_class, self.logits, self.pred_boxes, self.extra = matcher_class, logits, pred_boxes, extra
        self.indices = None
        self._handle = None
        self._clamped = None

    @property
    def clamped_boxes(self) -> torch.Tensor:
        """The boxes as D-FINE's and DEIMv2's losses match them, clamped to [0, 1] (no gradient: they only choose
        the matches); the same numbers for sigmoid boxes."""
        if self._clamped is None:
            self._clamped = self.pred_boxes.detach().clamp(min=0, max=1)
        return self._clamped

    def _hook(self, module, args, kwargs, output):
        if self.indices is not None or not isinstance(module, self.matcher_class):
            return
        # A matcher's call: (outputs, targets, *extra), any of them by keyword.
        outputs = args[0] if args else kwargs.get("outputs")
        extra = tuple(args[2:]) + tuple(value for key, value in kwargs.items() if key not in ("outputs", "targets"))
        if not isinstance(outputs, dict) or extra != self.extra:
            return
        boxes = outputs.get("pred_boxes")
        if self._same(outputs.get("logits"), self.logits) and (
                self._same(boxes, self.pred_boxes) or self._same(boxes, self.clamped_boxes)):
            self.indices = output

    @staticmethod
    def _same(tensor, reference) -> bool:
        return tensor is reference or (isinstance(tensor, torch.Tensor) and tensor.shape == reference.shape
                                       and torch.equal(tensor, reference))

    def __enter__(self):
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


_MATCHER_CLASSES: dict = {}


def _matcher_class(family: ModelFamily, config) -> type:
    """The class of the module ``family.matcher`` builds (one build per matcher function and process)."""
    if family.matcher not in _MATCHER_CLASSES:
        _MATCHER_CLASSES[family.matcher] = type(family.matcher(config))
    return _MATCHER_CLASSES[family.matcher]


def _matcher_extra(family: ModelFamily, config, logits) -> tuple:
    """The matcher's arguments after ``(outputs, targets)``: group DETR's group count, else none."""
    return (family.query_groups(config, logits.shape[1]),) if family.query_groups is not None else ()


def logit_mixing_loss(family: ModelFamily, config, logits, pred_boxes, targets, num_boxes,
                      indices=None) -> torch.Tensor:
    """``L_R`` of the final layer's matched queries: sigmoid focal loss of the mixed logits against the smoothed
    targets (sigmoid heads), or their soft-target cross-entropy (DETR's softmax head), over ``num_boxes`` (group
    DETR: every box is matched once per group, and counted once per group, as the parent's own losses do).
    ``indices``: the final layer's matches when known (:class:`FinalLayerMatches`), else the matcher is run."""
    extra = _matcher_extra(family, config, logits)
    if indices is None:
        indices = family.matcher(config)({"logits": logits, "pred_boxes": pred_boxes}, targets, *extra)
    if extra:
        num_boxes = num_boxes * extra[0]
    if family.softmax_head:
        return softmax_logit_mixing_loss(logits, targets, indices, num_boxes, config.logit_mixing_alpha)
    focal_alpha, focal_gamma = family.mixing_focal(config)
    return sigmoid_logit_mixing_loss(logits, targets, indices, num_boxes, config.logit_mixing_alpha, focal_alpha,
                                     focal_gamma)


def calibrated_loss(model, loss_function, *args, **kwargs):
    """The parent's ``loss_function(*args, **kwargs)`` with the Cal-DETR method around it (module docstring).

    Returns ``(loss, loss_dict, auxiliary_outputs)``, as transformers' loss functions do.
    """
    config, family = model.config, model.cal_family
    arguments = _bind(loss_function, args, kwargs)
    num_denoising = _num_denoising(arguments)
    logits, targets = arguments["logits"], arguments["labels"]
    final = logits[:, num_denoising:] if num_denoising else logits
    if config.uncertainty_modulation != "none":
        layers = matching_layer_logits(model, family, arguments)
        final = modulate_logits(final, logit_uncertainty(layers), config.uncertainty_modulation)
        arguments["logits"] = torch.cat([logits[:, :num_denoising], final], dim=1) if num_denoising else final
    matches = None
    if config.use_logit_mixing:
        pred_boxes = arguments["pred_boxes"][:, num_denoising:] if num_denoising else arguments["pred_boxes"]
        matches = FinalLayerMatches(_matcher_class(family, config), final, pred_boxes, _matcher_extra(family, config, final))
        with matches:
            loss, loss_dict, auxiliary_outputs = loss_function(**arguments)
    else:
        loss, loss_dict, auxiliary_outputs = loss_function(**arguments)
    device = logits.device
    # One cross-process reduction a step, shared by the normaliser and the mixing loss.
    global_boxes = num_boxes_across_processes(targets, device)
    if config.num_boxes_normalization == "global" and world_size() > 1:  # one process: the same normaliser
        loss, loss_dict = _rescale_to_global_normaliser(family, config, loss, loss_dict, targets, global_boxes,
                                                        device)
    if matches is not None:
        boxes = matches.pred_boxes if matches.indices is not None else matches.clamped_boxes  # to match again
        mixing = logit_mixing_loss(family, config, final, boxes, targets, global_boxes, matches.indices)
        loss = torch.add(loss, mixing, alpha=config.logit_mixing_loss_coefficient)
        loss_dict = {**loss_dict, "loss_logit_mixing": mixing}
    return loss, loss_dict, auxiliary_outputs


class CalibratedDetectorMixin:
    """What a Cal model adds to its transformers parent. Put it first among the bases:
    ``class CalXForObjectDetection(CalibratedDetectorMixin, XForObjectDetection)``, with ``cal_family`` set.

    - The Cal settings are checked again: ``from_pretrained(..., field=value)`` sets config attributes after the
      config's own checks.
    - ``loss_function`` is the parent's (or one the user sets), wrapped by :func:`calibrated_loss`.
    - With ``config.modulate_at_inference``, the returned ``logits`` are modulated outside training too.
    - Families whose parent keeps no per-layer state (DETR without ``auxiliary_loss``) get a forward hook on the
      layers that hold it (:meth:`_record_layer_output`), from the first forward with the modulation on.
    """

    cal_family: ModelFamily

    def __init__(self, config):
        config.validate_calibration_settings()
        super().__init__(config)
        self._layer_outputs = {}
        self._recording = False

    def _record_layers_if_needed(self) -> None:
        """Hook the layers whose outputs the method needs, once, on the first forward that needs them (with the
        method off there is no hook, and no cost)."""
        config = self.config
        if (self._recording or self.cal_family.recorded_layers is None
                or (config.uncertainty_modulation == "none" and not config.modulate_at_inference)):
            return
        for layer in self.cal_family.recorded_layers(self):
            layer.register_forward_hook(self._record_layer_output)
        self._recording = True

    def _record_layer_output(self, module, args, output):
        """Forward hook: keeps a reference to ``module``'s output (no copy, nothing added to the autograd graph).

        Why a hook: DETR without ``auxiliary_loss`` keeps no per-layer decoder state, and switching it on changes
        the decoder; ``output_hidden_states=True`` would also record every encoder layer on every step.
        """
        self._layer_outputs[module] = output[0] if isinstance(output, tuple) else output

    def _recorded_layer_outputs(self) -> list[torch.Tensor]:
        try:
            return [self._layer_outputs[layer] for layer in self.cal_family.recorded_layers(self)]
        except KeyError:
            raise RuntimeError("a decoder layer's output was not recorded: the Cal model hooks its decoder layers "
                               "when it is built; were the layers replaced?") from None

    @classmethod
    def is_custom_code(cls) -> bool:
        """The parent's answer: a Cal model runs the parent's transformers code (only its loss is wrapped), so
        transformers applies the parent's checkpoint key conversions to it (it skips them for custom code)."""
        return cls.cal_family.model_class.is_custom_code()

    @property
    def loss_function(self):
        loss_function = getattr(self, "_loss_function", None) or stock_loss_function(self.cal_family.model_class)
        return partial(calibrated_loss, self, loss_function)

    @loss_function.setter
    def loss_function(self, value):
        self._loss_function = value

    def forward(self, *args, **kwargs):
        config = self.config
        self._record_layers_if_needed()
        if self.training or not config.modulate_at_inference or config.uncertainty_modulation == "none":
            return super().forward(*args, **kwargs)
        family = self.cal_family
        if family.layer_logits is None:
            raise ValueError(f"modulate_at_inference=True: {type(self).__name__}'s parent computes the final "
                             "decoder layer only at inference, so there is no uncertainty to modulate by; set "
                             "modulate_at_inference=False")
        return_dict = kwargs.pop("return_dict", None)
        outputs = super().forward(*args, return_dict=True, **kwargs)
        if family.recorded_layers is not None and getattr(outputs, "decoder_hidden_states", None) is None:
            earlier = family.recorded_layer_logits(self, self._recorded_layer_outputs())
            layers = torch.cat([earlier, outputs.logits.unsqueeze(1)], dim=1)
        else:
            layers = family.layer_logits(self, outputs)
        outputs.logits = modulate_logits(outputs.logits, logit_uncertainty(layers), config.uncertainty_modulation)
        use_return_dict = config.return_dict if return_dict is None else return_dict
        return outputs if use_return_dict else outputs.to_tuple()


def _cal_model_class(model_type: str, family: ModelFamily) -> type:
    """``Cal`` + the parent's name: the parent with :class:`CalibratedDetectorMixin` and its Cal config."""
    from ..configuration import CAL_CONFIG_CLASSES

    parent = family.model_class
    name = "Cal" + parent.__name__
    namespace = {
        "__module__": "hf_caldetr.models",
        "__qualname__": name,
        "__doc__": f"Differs from `{parent.__name__}` in its loss (Cal-DETR's uncertainty-guided logit modulation "
                   "of the final layer in training, and the logit-mixing loss; see `hf_caldetr.models.calibrated`) "
                   "and, with `modulate_at_inference`, its returned logits. The parameters are exactly the "
                   "parent's, so checkpoints load both ways.",
        "config_class": CAL_CONFIG_CLASSES[model_type],
        "cal_family": family,
    }
    return type(name, (CalibratedDetectorMixin, parent), namespace)


def _share_checkpoint_conversions(cal_class: type, parent: type) -> None:
    """Give ``cal_class`` the parent's class-specific checkpoint key conversions (transformers renames legacy and
    original-repository keys when loading, and back when saving; it looks them up by class name first, then by
    model type, which the Cal class shares): without them a Cal RF-DETR saves keys the stock class does not read."""
    from transformers import conversion_mapping

    mapping = conversion_mapping.get_checkpoint_conversion_mapping(parent.__name__)
    if mapping:
        conversion_mapping.register_checkpoint_conversion_mapping(cal_class.__name__, mapping, overwrite=True)


CAL_MODEL_CLASSES = {model_type: _cal_model_class(model_type, family) for model_type, family in MODEL_FAMILIES.items()}
for _model_type, _cal_class in CAL_MODEL_CLASSES.items():
    _share_checkpoint_conversions(_cal_class, MODEL_FAMILIES[_model_type].model_class)
