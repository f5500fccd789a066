"""Score models of fixed SDEs (VP, sub-VP, VE) trained by likelihood-weighted score matching.

Song, Durkan, Murray, Ermon (2021), "Maximum Likelihood Training of Score-Based Diffusion
Models": with the weighting lambda(t) = g(t)^2, the denoising score-matching loss

    J(x) = 0.5 * integral_{t_min}^1 g(t)^2 E ||s_theta(z_t, t) - grad log q(z_t | x)||^2 dt

bounds the negative log-likelihood (their Theorem 1, with the prior and decoder terms). For a
linear SDE with z_t | x ~ N(m_t x, s_t^2 I), parametrise the score by a noise prediction,
s_theta = -eps_hat / s_t (so grad log q = -eps / s_t), and write
gamma(t) = log(s_t^2 / m_t^2), the log noise-to-signal ratio that vdm_tf's denoisers are
conditioned on. The moment equations dm/dt = f m and d(s^2)/dt = 2 f s^2 + g^2 give

    d gamma / dt = g(t)^2 / s_t^2,

so the integrand is 0.5 gamma'(t) ||eps - eps_hat||^2: exactly VDM's continuous-time diffusion
loss (VDM eq. 17) on the schedule gamma(t). And z_t / sqrt(m_t^2 + s_t^2) = alpha z + sigma eps
with alpha^2 = sigmoid(-gamma): every linear SDE is a variance-preserving diffusion in
disguise (VDM section 5.1). The loss depends only on the endpoints gamma(t_min), gamma(1)
(VDM eq. 17 is invariant to the path in between), so the time is drawn uniformly in gamma
rather than in t: importance sampling with density proportional to g^2 / s^2, which removes the
1/t spike of the VP SDE near t_min that Song et al. fight with their own importance sampler.

A `ScoreSDEModel` is therefore a `vdm_tf.VDM` with a fixed linear schedule between the SDE's
endpoints (its ELBO, training step, ancestral sampler and export work unchanged), whose `.sde`
is the SDE itself: predictor-corrector and probability-flow samplers and the ODE likelihood run
in the SDE's own coordinates (a VE model samples from N(0, sigma_max^2)).
"""

import keras
import tensorflow as tf

from vdm_tf import schedules
from vdm_tf import sde as sdes
from vdm_tf.models.vdm import VDM


@keras.saving.register_keras_serializable(package="vdm_tf")
class ScoreSDEModel(VDM):
    """A noise-prediction score model of a VP, sub-VP or VE SDE, trained on the likelihood bound.

    Args:
        denoiser: a layer `eps_hat = denoiser(z, gamma)` on variance-preserving inputs (as for
            `VDM`); build a `ScoreUNet` with gamma_min, gamma_max = `gamma_range(sde)`.
        sde: a `vdm_tf.sde.VPSDE`, `SubVPSDE` or `VESDE`.
        image_shape: (H, W, C).
        **kwargs: `timesteps`, `seed`, `augmentation` and Keras arguments, as for `VDM`.

    Example:
    >>> process = vdm_tf.sde.SubVPSDE()
    >>> denoiser = vdm_tf.networks.ScoreUNet(n_layers=4, n_embd=64, gamma_min=-27.6, gamma_max=10.1)
    >>> model = vdm_tf.score_model.ScoreSDEModel(denoiser, process, image_shape=(8, 8, 1))
    >>> model.compile(optimizer=vdm_tf.optimizers.AdamW(2e-4)); model.fit(...)   # the bpd bound
    >>> x = vdm_tf.samplers.sample(model, 16, sampler="pc", num_steps=500, seed=0)

    Reference: Song et al. 2021, "Maximum Likelihood Training of Score-Based Diffusion Models",
    arXiv:2101.09258; Kingma et al. 2021, "Variational Diffusion Models", section 5.1.
    """

    def __init__(self, denoiser, sde, image_shape, **kwargs):
        kwargs.pop("schedule", None)  # from_config: the schedule follows from the SDE
        self._sde = sde
        super().__init__(denoiser, schedules.FixedLinear(*gamma_range(sde)), image_shape, **kwargs)

    @property
    def sde(self):
        return self._sde

    def score(self, z, t):
        """-eps_hat(z / sqrt(m_t^2 + s_t^2), gamma(t)) / s_t: the score in the SDE's coordinates."""
        t = tf.broadcast_to(tf.cast(t, tf.float32), tf.shape(z)[:1])
        mean, std = self._sde.marginal(t)
        scale = sdes.per_example(tf.sqrt(tf.square(mean) + tf.square(std)), z)
        eps_hat = self.denoiser(z / scale, self._sde.gamma(t), training=False)
        return -eps_hat / sdes.per_example(std, z)

    def get_config(self):
        config = super().get_config()
        config.update(sde={"name": sdes.name_of(self._sde), "config": self._sde.get_config()})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["sde"] = sdes.from_config(config["sde"]["name"], config["sde"]["config"])
        return super().from_config(config)


def gamma_range(sde):
    """(gamma(t_min), gamma(1)) of an SDE: the endpoints of its equivalent VDM schedule."""
    gammas = sde.gamma(tf.constant([sde.t_min, 1.0]))
    return float(gammas[0]), float(gammas[1])
