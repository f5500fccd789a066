"""AdamW with its per-variable update in TensorFlow's fused training kernels.

`keras.optimizers.AdamW` writes each variable's update as about sixty small graph ops: the
learning-rate schedule evaluated again for the weight decay, the bias corrections, the moment
updates, the EMA. The paper's network has 691 variables, so the train step's graph holds some
42,000 optimizer ops (91% of the graph outside the U-Net's blocks), and tracing them and
optimizing them (grappler) is most of the wait before the first training step.

`AdamW` here is the same optimizer (same hyper-parameters, slot variables, EMA, checkpoints and
config) whose step computes the shared scalars once and then updates each variable with
TensorFlow's fused kernels: `ResourceApplyAdam` (Kingma & Ba 2015, Algorithm 1, in the
efficient form of Section 2: `alpha_t = lr sqrt(1 - beta_2^t) / (1 - beta_1^t)`, as Keras's Adam
computes it), the decoupled weight decay before it (Loshchilov & Hutter 2019, Algorithm 2, line 12,
as Keras applies it), and the EMA after it, with `ResourceApplyGradientDescent`. About fifteen ops
per variable instead of sixty to eighty. The kernels exist on CPU, GPU and under XLA (TPU, `jit_compile=True`),
and `tf.distribute` strategies update each replica's copy as Keras does; with several replicas,
the clipping by global norm applies to the summed gradient, as on one device.

Cases the fused step does not cover (gradient accumulation, AMSGrad, EMA overwrite frequency,
sparse gradients, another backend than TensorFlow) run Keras's own step.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="vdm_tf")
class AdamW(keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` with a fused update: same arguments, results and variables.

    Args: as `keras.optimizers.AdamW`.

    Example:
    >>> model.compile(optimizer=vdm_tf.optimizers.AdamW(2e-4, beta_2=0.99, weight_decay=0.01,
    ...                                                  use_ema=True, ema_momentum=0.9999))

    Reference: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2;
    Kingma & Ba 2015, "Adam", Algorithm 1 and Section 2.
    """

    def _fused(self, grads):
        return (
            keras.backend.backend() == "tensorflow"
            and not self.gradient_accumulation_steps
            and not self.amsgrad
            and not self.ema_overwrite_frequency
            and not any(isinstance(grad, tf.IndexedSlices) for grad in grads)
        )

    def _backend_apply_gradients(self, grads, trainable_variables):
        if not self._fused(grads):
            return super()._backend_apply_gradients(grads, trainable_variables)
        variables = [variable.value if isinstance(variable, keras.Variable) else variable
                     for variable in trainable_variables]
        # Sum the replicas' gradients first, then clip: the global batch's gradient is clipped by
        # its norm. (Keras clips each replica's share by that share's norm before summing them,
        # so that training with several replicas differs from one device.)
        grads_and_vars = self._all_reduce_sum_gradients(list(zip(grads, variables)))
        grads = self._clip_gradients([grad for grad, _ in grads_and_vars])
        grads_and_vars = list(zip(grads, variables))
        # The step's scalars, once (Keras computes them again for every variable).
        learning_rate = tf.cast(self.learning_rate, tf.float32)
        step = tf.cast(self.iterations + 1, tf.float32)
        scalars = dict(
            lr=learning_rate,
            beta1=tf.constant(self.beta_1, tf.float32),
            beta2=tf.constant(self.beta_2, tf.float32),
            epsilon=tf.constant(self.epsilon, tf.float32),
            beta1_power=tf.pow(tf.constant(self.beta_1, tf.float32), step),
            beta2_power=tf.pow(tf.constant(self.beta_2, tf.float32), step),
        )
        decay = learning_rate * self.weight_decay if self.weight_decay else None
        # The EMA starts at the first step's weights (Keras: momentum 0 at iteration 0).
        ema_rate = None
        if self.use_ema:
            ema_rate = tf.where(tf.equal(self.iterations, 0), 1.0, 1.0 - self.ema_momentum)

        def update(variable, grad, m, v, average):
            if decay is not None and self._use_weight_decay(variable):
                # var <- var - lr * weight_decay * var, before the Adam step (Keras's order).
                tf.raw_ops.ResourceApplyGradientDescent(
                    var=variable.handle, alpha=decay, delta=variable.read_value()
                )
            tf.raw_ops.ResourceApplyAdam(
                var=variable.handle, m=m.handle, v=v.handle, grad=tf.cast(grad, variable.dtype), **scalars
            )
            if average is not None:
                # average <- momentum average + (1 - momentum) var = average - (1 - momentum)(average - var)
                tf.raw_ops.ResourceApplyGradientDescent(
                    var=average.handle, alpha=ema_rate, delta=average.read_value() - variable.read_value()
                )

        def slots(variable):
            index = self._get_variable_index(variable)
            average = self._model_variables_moving_average[index] if self.use_ema else None
            return [slot.value if slot is not None else None
                    for slot in (self._momentums[index], self._velocities[index], average)]

        def apply(distribution, grads_and_vars):
            for grad, variable in grads_and_vars:
                distribution.extended.update(
                    variable, update, args=(grad, *slots(variable)), group=False
                )

        tf.__internal__.distribute.interim.maybe_merge_call(apply, self._distribution_strategy, grads_and_vars)
        if self.use_ema:  # Keras moves every variable's average, also those without a gradient this step
            updated = {self._var_key(variable) for variable in variables}
            for variable in self._trainable_variables:
                if self._var_key(variable) not in updated:
                    average = self._model_variables_moving_average[self._get_variable_index(variable)]
                    average.assign(average - ema_rate * (average - variable))
