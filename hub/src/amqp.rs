//! The AMQP head (`edgehub-amqp`) as a protocol head of the hub's
//! transports: AMQPS streams go to it.

use std::sync::Arc;

use tokio::sync::watch;

use crate::transport::{Accepted, BoxFuture, Head};

pub struct AmqpHead(pub Arc<edgehub_amqp::AmqpHub>);

impl Head for AmqpHead {
    fn serve(self: Arc<Self>, a: Accepted, shutdown: watch::Receiver<bool>) -> BoxFuture {
        Box::pin(async move {
            edgehub_amqp::serve(self.0.clone(), a.stream, a.peer, a.client_chain, shutdown).await
        })
    }
}
